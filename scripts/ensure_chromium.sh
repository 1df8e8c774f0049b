#!/usr/bin/env bash
# The report test renders report.html in headless Chromium (Debian's package). `make test`
# runs this first: on a fresh machine it installs the package where apt-get can; where it
# cannot, it warns, and the report test fails with the command to run.
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
echo "installing chromium for the report test (apt-get)" >&2
(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
  || echo "warning: could not install chromium; tests/test_report.py's rendering test will fail" >&2
exit 0
