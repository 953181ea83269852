"""Entry point: ``python -m bench [--size 1G] [--repeat 3] [--quick] [--wan]`` for the read path,
``python -m bench write [--quick] [--wan] ...`` for the write path,
``python -m bench viewer [--quick] [--wan] [--repeat N]`` for a viewer reading a cold CT series,
``python -m bench suite [--quick] [--wan] [--repeat N]`` for cloudfs beside s3fs and rclone,
``python -m bench crypto [--quick] [--wan] [--repeat N]`` for the cost of encryption at rest."""

from __future__ import annotations

import sys

if sys.argv[1:2] == ["write"]:
    from .write import main

    raise SystemExit(main(sys.argv[2:]))

if sys.argv[1:2] == ["suite"]:
    from .suite import main as suite_main

    raise SystemExit(suite_main(sys.argv[2:]))

if sys.argv[1:2] == ["viewer"]:
    from .viewer import main as viewer_main

    raise SystemExit(viewer_main(sys.argv[2:]))

if sys.argv[1:2] == ["crypto"]:
    from .crypto import main as crypto_main

    raise SystemExit(crypto_main(sys.argv[2:]))

from .run import main

raise SystemExit(main())
