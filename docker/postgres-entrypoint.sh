#!/bin/sh
# Start PostgreSQL for pgolf: on the first start (an empty $PGDATA) create the cluster, the role and the database
# `pgolf`; then run the server in the foreground, listening on every interface of the host (network_mode: host),
# password-authenticated (scram-sha-256) from PGOLF_DB_ALLOW (CIDR, default every IPv4 address); the unix socket
# stays inside the container (/tmp) and is trusted, for the first-start setup only.
set -eu
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD (compose: PGOLF_DB_PASSWORD)}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    "$BIN/initdb" -D "$PGDATA" -U pgolf --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 \
        --encoding=UTF8 --locale=C.UTF-8
    rm -f "$pwfile"
    echo "host all all ${PGOLF_DB_ALLOW:-0.0.0.0/0} scram-sha-256" >> "$PGDATA/pg_hba.conf"
    "$BIN/pg_ctl" -D "$PGDATA" -o "-c listen_addresses='' -c unix_socket_directories=/tmp" -w start
    "$BIN/createdb" -h /tmp -U pgolf pgolf
    "$BIN/pg_ctl" -D "$PGDATA" -m fast -w stop
fi
exec "$BIN/postgres" -D "$PGDATA" -c listen_addresses='*' -c port="$PGPORT" -c unix_socket_directories=/tmp
