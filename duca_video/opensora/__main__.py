import sys

from .attach import main

sys.exit(main())
