import sys

from seqshard.launch.cli import main

sys.exit(main())
