import sys

from loaded.cli import main

sys.exit(main())
