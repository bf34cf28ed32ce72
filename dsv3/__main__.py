import sys

try:
    from dsv3.cli import main
except KeyboardInterrupt:  # Ctrl-C while the command is still being imported
    print("dsv3: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
