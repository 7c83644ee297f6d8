"""``python -m services``: the voicebus command."""

import sys

from services.cli import main

sys.exit(main())
