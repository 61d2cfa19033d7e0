import sys

from meanflow.prepare import main

sys.exit(main())
