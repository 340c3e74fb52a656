#!/usr/bin/env bash
# Makes what the Secrets of secrets.example.yaml hold, with the openssl
# command line: a private CA, the agents' server certificate, client
# certificates for the rollout Job and for a person, and the agents'
# tokens file. Then prints the kubectl commands that create the Secrets.
#
#   deploy/kubernetes/make-certs.sh [OUTDIR]      (default ./nine9s-certs)
#
# NAMESPACE (nine9s), SERVICE (nine9s-agents) and CLUSTER_DOMAIN
# (cluster.local) name the headless Service the certificate is for.
#
# One server certificate serves every agent. Its SANs are the headless
# Service's names and a wildcard under it: each agent is reached as
#   https://<pod IP, dashed>.nine9s-agents.nine9s.svc.cluster.local:50051
# (a StatefulSet's as https://nine9s-0.nine9s-agents…), which the wildcard
# covers whatever the pod's IP is today; localhost and 127.0.0.1 are for
# `kubectl port-forward`. Pod IPs themselves are not in it: they change
# with every pod, and a certificate cannot follow them.
#
# Keep ca.key out of the cluster (and offline): whoever holds it can make
# client certificates the agents accept.
set -euo pipefail

out=${1:-nine9s-certs}
namespace=${NAMESPACE:-nine9s}
service=${SERVICE:-nine9s-agents}
domain=${CLUSTER_DOMAIN:-cluster.local}
days=${DAYS:-365}

command -v openssl >/dev/null || { echo "make-certs.sh: needs the openssl command" >&2; exit 1; }
mkdir -p "$out"
cd "$out"
umask 077

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# sign NAME SUBJECT EXTENSIONS: NAME.key and NAME.crt, signed by the CA.
sign() {
    key "$1.key"
    openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
    printf '%s\n' "$3" >"$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
        -days "$days" -sha256 -extfile "$1.ext" -out "$1.crt" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}

if [[ ! -f ca.key ]]; then
    key ca.key
    openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=nine9s CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.crt
fi

fqdn="$service.$namespace.svc.$domain"
short="$service.$namespace.svc"
# The agents: server authentication only, so it cannot pass for a client.
sign agent "/CN=$fqdn" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:*.$fqdn,DNS:$fqdn,DNS:*.$short,DNS:$short,DNS:localhost,IP:127.0.0.1"

# Clients: the common name is the identity the agents look up in their
# tokens file. "rollout" is listed there as `rollout deploy -` (admitted
# by its certificate alone); "ops" sends a token as well.
for who in rollout ops; do
    sign "$who" "/CN=$who" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
done

if [[ ! -f ops.token ]]; then
    openssl rand -hex 32 >ops.token
fi
cat >tokens <<EOF
# NAME ROLE TOKEN: ROLE is read, deploy or admin; a TOKEN of "-" admits
# NAME only by a client certificate whose common name is NAME.
rollout deploy -
ops admin $(cat ops.token)
EOF

openssl verify -CAfile ca.crt agent.crt rollout.crt ops.crt >/dev/null
cat <<EOF
made in $PWD: ca.crt ca.key agent.{crt,key} rollout.{crt,key} ops.{crt,key} ops.token tokens
create the Secrets with:
  kubectl -n $namespace create secret generic nine9s-tokens --from-file=tokens=$PWD/tokens
  kubectl -n $namespace create secret generic nine9s-tls --type=kubernetes.io/tls \\
    --from-file=tls.crt=$PWD/agent.crt --from-file=tls.key=$PWD/agent.key --from-file=ca.crt=$PWD/ca.crt
  kubectl -n $namespace create secret generic nine9s-ctl --type=kubernetes.io/tls \\
    --from-file=tls.crt=$PWD/rollout.crt --from-file=tls.key=$PWD/rollout.key --from-file=ca.crt=$PWD/ca.crt
EOF
