#!/usr/bin/env bash
# Make sure redis-server is there for the KV tier tests: install Debian's `redis-server` with
# apt when it is missing and we are root. Never fails the build: without it the Redis tests
# skip and say why (each starts its own server on a free 127.0.0.1 port, no persistence).
command -v redis-server >/dev/null 2>&1 && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing redis-server (for the KV tier tests)..." >&2
    if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/tmp/kvcache-redis-install.log 2>&1; then
        # the package may start a system service; the tests start their own servers
        exit 0
    fi
    echo "warning: apt-get could not install redis-server (see /tmp/kvcache-redis-install.log); the Redis tier tests will be skipped" >&2
else
    echo "warning: redis-server is missing and cannot be installed here (needs apt-get as root); the Redis tier tests will be skipped" >&2
fi
exit 0
