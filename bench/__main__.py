"""Entry point: ``python -m bench [--size 1G] [--repeat 3] [--quick] [--wan]``."""

from __future__ import annotations

from .run import main

raise SystemExit(main())
