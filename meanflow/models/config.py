"""The `model.*` section of the run config: which network to build, and its size overrides."""

from dataclasses import dataclass

from meanflow.models import MODEL_NAMES
from meanflow.models.dit import HEADS, canvas_error
from meanflow.models.prediction import PREDICTIONS


@dataclass
class ModelConfig:
    name: str = "DiT-B/2"  # a size from meanflow.models (DiT-{S,B,M,L,XL}/{2,4,8}, small CPU sizes, MLP)
    input_size: int = 32  # side of the square input (latent or image) in pixels
    in_channels: int = 4  # channels of the input; for MLP, the vector dimension
    num_classes: int = 1000  # class-conditional with this many classes (+ a null class); 0: unconditional
    time_scale: float = 1.0  # times are embedded as t * time_scale (DiT used 1000; 1 trains stably here)
    prediction: str = "u"  # the output: "u" (the paper's); "x", a clean image D with u = (z - D) / max(t, 0.05);
    # "x_tanh", the same with D = tanh(output), for pixels in [-1, 1] (meanflow.models.prediction)
    head: str = "linear"  # DiT output: "linear" (DiT's, patch by patch) or "conv" (+ a residual 3x3 conv pair)
    long_skips: bool = False  # DiT: U-ViT's long skips, block i of the second half also reads block L-1-i's input
    canvas: int = 0  # DiT with prediction x/x_tanh: patches tile only the centred canvas^2 window, black (-1) around
    aux_head_depth: int = -1  # iMF models: blocks of the v-head (-1: the size's, 8 for the paper sizes; 0: none)

    def validate(self):
        if self.name not in MODEL_NAMES:
            raise ValueError(f"model.name: unknown model {self.name!r}; valid choices: {', '.join(MODEL_NAMES)}")
        for key in ("input_size", "in_channels"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key}: must be > 0, got {getattr(self, key)}")
        if self.num_classes < 0:
            raise ValueError(f"model.num_classes: must be >= 0, got {self.num_classes}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"model.prediction: must be one of {', '.join(PREDICTIONS)}, got {self.prediction!r}")
        if self.name.startswith("iMF-"):  # iMF's network predicts u and embeds h = t - r as it is
            if self.prediction != "u" or self.time_scale != 1.0:
                raise ValueError(f"model.prediction / model.time_scale: {self.name} supports only \"u\" and 1.0, got "
                                 f"{self.prediction!r} and {self.time_scale}")
        if self.aux_head_depth < -1 or (self.aux_head_depth != -1 and not self.name.startswith("iMF-")):
            raise ValueError(f"model.aux_head_depth: -1 (the size's), 0 or more blocks, and for iMF models only; got "
                             f"{self.aux_head_depth} for {self.name}")
        if self.head not in HEADS:
            raise ValueError(f"model.head: must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.long_skips and not self.name.startswith("DiT-"):
            raise ValueError(f"model.long_skips: a DiT option (skips between its blocks); {self.name} has none")
        if self.canvas and not self.name.startswith("DiT-"):
            raise ValueError(f"model.canvas: a DiT option (its patches tile the canvas); {self.name} has none")
        if self.name != "MLP":  # the patches must tile the canvas (iMF models: the whole input)
            error = canvas_error(self.input_size, int(self.name.split("/")[-1]), self.canvas, self.prediction)
            if error:
                raise ValueError(f"model.{error}")
        if self.name == "MLP" and self.head != "linear":
            raise ValueError(f"model.head: {self.head!r} is a DiT head over image patches; the MLP has none")

    def build_kwargs(self):
        """Keyword overrides of meanflow.models.create_model for this section."""
        if self.name.startswith("iMF-"):
            aux = None if self.aux_head_depth == -1 else self.aux_head_depth
            return dict(input_size=self.input_size, in_channels=self.in_channels, num_classes=self.num_classes,
                        aux_head_depth=aux)
        if self.name == "MLP":
            return dict(dim=self.in_channels, num_classes=self.num_classes, time_scale=self.time_scale,
                        prediction=self.prediction)
        return dict(input_size=self.input_size, in_channels=self.in_channels, num_classes=self.num_classes,
                    time_scale=self.time_scale, prediction=self.prediction, head=self.head,
                    long_skips=self.long_skips, canvas=self.canvas)
