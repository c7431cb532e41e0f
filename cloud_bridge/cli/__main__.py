"""`python -m cloud_bridge.cli`: the same as the `cloud-bridge` command."""

import sys

from cloud_bridge.cli import main

sys.exit(main())
