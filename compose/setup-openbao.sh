#!/bin/sh
# One-shot setup for compose/sidecar.yml: the database engine with a short-TTL role, and an
# AppRole whose role_id/secret_id go to a tmpfs volume the sidecar reads.
set -eu
bao secrets enable database 2>/dev/null || true
bao write database/config/pg plugin_name=postgresql-database-plugin allowed_roles=app \
  connection_url='postgresql://{{username}}:{{password}}@postgres:5432/postgres?sslmode=disable' \
  username=postgres password="$(cat /run/secrets/postgres_password)"
bao write database/roles/app db_name=pg default_ttl=1m max_ttl=5m \
  creation_statements="CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"
bao auth enable approle 2>/dev/null || true
printf 'path "database/creds/app" { capabilities = ["read"] }\npath "sys/leases/revoke" { capabilities = ["update"] }\n' \
  | bao policy write app -
bao write auth/approle/role/app token_policies=app token_ttl=10m token_max_ttl=1h
bao read -field=role_id auth/approle/role/app/role-id >/approle/vault_role_id
bao write -f -field=secret_id auth/approle/role/app/secret-id >/approle/vault_secret_id
chmod 0400 /approle/vault_role_id /approle/vault_secret_id
