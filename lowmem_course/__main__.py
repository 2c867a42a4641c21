"""``python -m lowmem_course``: the ``lowmem`` command."""

from lowmem_course.cli import main

raise SystemExit(main())
