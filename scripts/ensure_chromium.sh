#!/usr/bin/env bash
# Make sure a headless Chromium is there for the dashboard screenshot test: install Debian's
# `chromium` with apt when it is missing and we are root. Never fails the build: without a
# browser the screenshot test skips and says why.
for b in chromium chromium-browser google-chrome; do
    command -v "$b" >/dev/null 2>&1 && exit 0
done
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing chromium (for the dashboard screenshot test)..." >&2
    if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/tmp/kvcache-chromium-install.log 2>&1; then
        exit 0
    fi
    echo "warning: apt-get could not install chromium (see /tmp/kvcache-chromium-install.log); the dashboard screenshot test will be skipped" >&2
else
    echo "warning: chromium is missing and cannot be installed here (needs apt-get as root); the dashboard screenshot test will be skipped" >&2
fi
exit 0
