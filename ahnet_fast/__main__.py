import sys

from ahnet_fast.cli import main

sys.exit(main())
