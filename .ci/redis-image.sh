#!/usr/bin/env bash
# Builds the local `redis:7.2` image that the Docker test backend asks for,
# without pulling from a registry: a root filesystem holding this machine's
# /usr/bin/redis-server, the shared libraries `ldd` lists for it, a /bin/sh,
# and an entrypoint that adds `--protected-mode no` when the command is
# redis-server (as the official image does), imported with `docker import`.
#
#   .ci/redis-image.sh [TAG]      # default TAG: redis:7.2
set -euo pipefail

tag="${1:-redis:7.2}"
server="$(command -v redis-server)"
shell=/bin/sh

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT

mkdir -p "$root/usr/local/bin" "$root/bin" "$root/data" "$root/tmp" "$root/etc"
chmod 1777 "$root/tmp"
# /usr/bin/redis-server is a symlink to redis-check-rdb on Debian, and Redis
# chooses what to run from argv[0]: copy the file under the server's name.
cp -L "$server" "$root/usr/local/bin/redis-server"
cp -L "$shell" "$root/bin/sh"

# Every library either binary needs, at the path the loader looks for it.
for lib in $(ldd "$server" "$shell" | grep -v ':$' | grep -o '/[^ ]*' | sort -u); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done

printf 'redis:x:999:999::/data:/bin/sh\nroot:x:0:0::/root:/bin/sh\n' >"$root/etc/passwd"
printf 'redis:x:999:\nroot:x:0:\n' >"$root/etc/group"

cat >"$root/usr/local/bin/docker-entrypoint.sh" <<'ENTRY'
#!/bin/sh
set -e
# `redis-server --port 1` or `/path/redis.conf`: the server is meant.
case "$1" in
    -*|*.conf) set -- redis-server "$@" ;;
esac
if [ "$1" = "redis-server" ]; then
    shift
    set -- redis-server --protected-mode no "$@"
fi
exec "$@"
ENTRY
chmod 755 "$root/usr/local/bin/docker-entrypoint.sh"

tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' \
    --change 'WORKDIR /data' \
    --change 'EXPOSE 6379' \
    --change 'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' \
    --change 'CMD ["redis-server"]' \
    - "$tag" >/dev/null
echo "built $tag from $("$server" --version | cut -d' ' -f1-3)"
