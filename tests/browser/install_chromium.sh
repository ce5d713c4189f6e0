#!/usr/bin/env bash
# The browser test drives the operating system's Chromium. Install it if none is found:
# from apt, as root (CI) or with passwordless sudo. Fails, saying what to do, when it cannot.
set -euo pipefail
found() {
  if [ -n "${GPT2_COURSE_CHROMIUM:-}" ]; then [ -x "$GPT2_COURSE_CHROMIUM" ]; return; fi
  command -v chromium || command -v chromium-browser || command -v google-chrome \
    || command -v google-chrome-stable
} >/dev/null 2>&1
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif sudo -n true 2>/dev/null; then sudo -n "$@"; else return 1; fi
}
found && exit 0
if command -v apt-get >/dev/null; then
  echo "Installing Chromium from apt (the browser test's browser)..."
  if (as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq chromium) >/dev/null 2>&1 && found; then
    exit 0
  fi
fi
cat >&2 <<'MSG'
The browser test needs Chromium and none could be found or installed.
Install it from your OS packages (Debian: `apt-get install chromium`, as root), or set
GPT2_COURSE_CHROMIUM to a Chromium or Chrome executable, then run `make test-browser` again.
MSG
exit 1
