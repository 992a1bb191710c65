"""`python -m duca_video.opensora`: see duca_video.opensora."""

from __future__ import annotations

import sys

from .attach import main

sys.exit(main())
