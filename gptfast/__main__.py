import sys

from gptfast.cli import main

sys.exit(main())
