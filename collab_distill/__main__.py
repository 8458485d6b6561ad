import sys

from collab_distill.cli import main

sys.exit(main())
