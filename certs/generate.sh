#!/usr/bin/env bash
# Regenerates the DEVELOPMENT-ONLY certificates used by the wsgate quick start.
#
#   bash certs/generate.sh
#
# Writes, next to this script:
#   dev-ca.pem      development CA certificate (ECDSA P-256, CA:TRUE, 10 years)
#   dev-ca.key      its private key (PKCS#8 PEM, unencrypted)
#   localhost.pem   server certificate for localhost / 127.0.0.1 / ::1, signed by the
#                   CA above (leaf only, no chain)
#   localhost.key   its private key (PKCS#8 PEM, unencrypted, readable by rustls)
#
# These files are committed on purpose so the quick start works out of the box.
# Their private keys are public: NEVER use them, or trust dev-ca.pem, in production.
set -euo pipefail

command -v openssl >/dev/null 2>&1 || { echo "generate.sh: openssl not found" >&2; exit 1; }

dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
days=3650

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# --- development CA -------------------------------------------------------------------
cat >"$tmp/ca.cnf" <<'CNF'
[req]
prompt             = no
utf8               = yes
string_mask        = utf8only
distinguished_name = dn
x509_extensions    = v3_ca

[dn]
CN = wsgate development CA — DO NOT TRUST IN PRODUCTION

[v3_ca]
basicConstraints       = critical, CA:TRUE, pathlen:0
keyUsage               = critical, keyCertSign, cRLSign
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always
CNF

openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tmp/dev-ca.key"
openssl req -new -x509 -config "$tmp/ca.cnf" -key "$tmp/dev-ca.key" \
    -sha256 -days "$days" -set_serial "0x$(openssl rand -hex 16)" \
    -out "$tmp/dev-ca.pem"

# --- localhost server certificate -----------------------------------------------------
cat >"$tmp/leaf.cnf" <<'CNF'
[req]
prompt             = no
distinguished_name = dn

[dn]
CN = localhost

[v3_leaf]
basicConstraints       = critical, CA:FALSE
keyUsage               = critical, digitalSignature
extendedKeyUsage       = serverAuth
subjectAltName         = DNS:localhost, IP:127.0.0.1, IP:::1
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid, issuer
CNF

openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tmp/localhost.key"
openssl req -new -config "$tmp/leaf.cnf" -key "$tmp/localhost.key" -sha256 -out "$tmp/localhost.csr"
openssl x509 -req -in "$tmp/localhost.csr" \
    -CA "$tmp/dev-ca.pem" -CAkey "$tmp/dev-ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -sha256 -days "$days" \
    -extfile "$tmp/leaf.cnf" -extensions v3_leaf \
    -out "$tmp/localhost.pem"

# Sanity check before replacing anything.
openssl verify -CAfile "$tmp/dev-ca.pem" "$tmp/localhost.pem" >/dev/null

for f in dev-ca.pem dev-ca.key localhost.pem localhost.key; do
    # Mode 0644 on purpose: these are public development files, and a non-root
    # container user must be able to read them.
    chmod 0644 "$tmp/$f"
    mv -f "$tmp/$f" "$dir/$f"
done

echo "wrote $dir/{dev-ca.pem,dev-ca.key,localhost.pem,localhost.key} (DEVELOPMENT ONLY)"
