# PostgreSQL for a pgolf cluster (`docker compose --profile cluster up postgres`): Debian's own postgresql package.
#
#   docker build -f docker/postgres.Dockerfile -t pgolf-postgres .
#   docker build --network host --build-arg BASE_IMAGE=pgolf-smoke-base:bookworm-torch2.13.0-cpu \
#       -f docker/postgres.Dockerfile -t pgolf-postgres .     # no image registry: docker/smoke.sh's debootstrap base
#
# Any Debian bookworm root will do as the base (the package comes from Debian's mirror, like every other package the
# images install), so a machine without an image registry builds it on the debootstrap base that docker/smoke.sh
# makes. The first start creates the cluster in the `postgres-data` volume with the role and database `pgolf`
# (password POSTGRES_PASSWORD, scram-sha-256 over TCP); later starts reuse it.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/data
COPY docker/postgres-entrypoint.sh /usr/local/bin/pgolf-postgres
ENV PGDATA=/var/lib/postgresql/data \
    PGPORT=5432
USER postgres
HEALTHCHECK --interval=5s --timeout=5s --start-period=30s --retries=5 \
    CMD pg_isready -h 127.0.0.1 -p "$PGPORT" -U pgolf -d pgolf
CMD ["sh", "/usr/local/bin/pgolf-postgres"]
