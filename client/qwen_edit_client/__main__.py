"""`python -m qwen_edit_client` runs the `qwen-edit` command."""

import sys

from .cli import main

sys.exit(main())
