#!/usr/bin/env bash
# Generate a test PKI and MQTT credentials for the brokers in mosquitto/ (never commit the output).
#
#   scripts/gen-certs.sh [-o DIR] [-H SAN,...] [-g GATEWAY,...] [-d DEVICE,...] [-b BRIDGE,...]
#
#   -o DIR   output directory (default build/pki; build/ is git-ignored)
#   -H SANs  extra subjectAltNames for the cloud broker cert, e.g. DNS:mqtt.example.com,IP:10.0.0.5
#            (always included: DNS:localhost, DNS:mosquitto, IP:127.0.0.1)
#   -g NAMES gateway client certificates (CN = name = the gateway's account on the cloud broker)
#   -d NAMES device accounts (username = device id); default pi-0001,pi-0002,pi-0003
#   -b NAMES cloud-bridge accounts (fleet-wide rights); default cloud-bridge
#
# Writes: ca.crt ca.key server.crt server.key gateways/NAME.{crt,key} passwd (mosquitto_passwd hashes)
# and credentials.env (NAME_MQTT_PASSWORD=... lines, in the format compose's .env expects; keep it secret).
# Running it again keeps an existing CA and accounts and only adds what is missing, so devices already
# provisioned keep working.
set -euo pipefail

OUT="build/pki"
EXTRA_SANS=""
GATEWAYS="gateway-01"
DEVICES="pi-0001,pi-0002,pi-0003"
BRIDGES="cloud-bridge"
DAYS="${GEN_CERTS_DAYS:-825}"

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }

while getopts "o:H:g:d:b:h" opt; do
  case "$opt" in
    o) OUT="$OPTARG" ;;
    H) EXTRA_SANS="$OPTARG" ;;
    g) GATEWAYS="$OPTARG" ;;
    d) DEVICES="$OPTARG" ;;
    b) BRIDGES="$OPTARG" ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done

for tool in openssl mosquitto_passwd; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "gen-certs: $tool not found: apt-get install -y openssl mosquitto-clients mosquitto" >&2
    exit 1
  fi
done

# Account names become MQTT usernames and ACL %u substitutions: same rule as schemas/topics.py ids.
valid_name() { [[ "$1" =~ ^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$ ]] && [ "$1" != models ]; }

mkdir -p "$OUT/gateways"
chmod 700 "$OUT"
umask 077

if [ ! -f "$OUT/ca.key" ]; then
  openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$DAYS" \
    -keyout "$OUT/ca.key" -out "$OUT/ca.crt" -subj "/CN=edgefleet test CA" 2>/dev/null
  echo "gen-certs: new CA $OUT/ca.crt"
fi

# sign BASE CN EXTENSIONS: BASE.key and BASE.crt for CN, signed by the CA, with openssl x509v3 EXTENSIONS.
sign() {
  local base="$1" cn="$2" ext="$3"
  local extfile
  extfile="$(mktemp)"
  printf '%s\n' "$ext" >"$extfile"
  openssl req -newkey rsa:2048 -nodes -sha256 -keyout "$base.key" -out "$base.csr" -subj "/CN=$cn" 2>/dev/null
  openssl x509 -req -sha256 -days "$DAYS" -in "$base.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" \
    -CAcreateserial -out "$base.crt" -extfile "$extfile" 2>/dev/null
  rm -f "$base.csr" "$extfile"
}

if [ ! -f "$OUT/server.crt" ]; then
  sans="DNS:localhost,DNS:mosquitto,IP:127.0.0.1${EXTRA_SANS:+,$EXTRA_SANS}"
  sign "$OUT/server" "mosquitto" "subjectAltName=$sans
extendedKeyUsage=serverAuth"
  echo "gen-certs: server certificate $OUT/server.crt ($sans)"
fi

IFS=',' read -r -a gateway_list <<<"$GATEWAYS"
for gw in "${gateway_list[@]}"; do
  valid_name "$gw" || { echo "gen-certs: gateway name '$gw' is not a valid id" >&2; exit 2; }
  if [ ! -f "$OUT/gateways/$gw.crt" ]; then
    # The cloud broker's gateway listener takes the CN as the username (use_identity_as_username).
    sign "$OUT/gateways/$gw" "$gw" "extendedKeyUsage=clientAuth"
    echo "gen-certs: gateway client certificate $OUT/gateways/$gw.crt"
  fi
done

touch "$OUT/passwd" "$OUT/credentials.env"
env_name() { printf '%s_MQTT_PASSWORD' "$(printf '%s' "$1" | tr '[:lower:]' '[:upper:]' | tr -c 'A-Z0-9\n' '_')"; }

add_account() {
  local user="$1" var
  valid_name "$user" || { echo "gen-certs: account name '$user' is not a valid id" >&2; exit 2; }
  var="$(env_name "$user")"
  if grep -q "^$user:" "$OUT/passwd"; then
    return
  fi
  local password
  password="$(openssl rand -base64 24 | tr -d '/+=\n')"
  mosquitto_passwd -b "$OUT/passwd" "$user" "$password"
  printf '%s=%s\n' "$var" "$password" >>"$OUT/credentials.env"
  echo "gen-certs: account $user (password in $OUT/credentials.env as $var)"
}

IFS=',' read -r -a bridge_list <<<"$BRIDGES"
IFS=',' read -r -a device_list <<<"$DEVICES"
for user in "${bridge_list[@]}" "${device_list[@]}"; do
  [ -n "$user" ] && add_account "$user"
done

# The broker reads these as its own user inside the container: readable, never world-writable.
chmod 644 "$OUT/ca.crt" "$OUT/server.crt" "$OUT"/gateways/*.crt
chmod 640 "$OUT/server.key" "$OUT/passwd" "$OUT"/gateways/*.key
chmod 755 "$OUT" "$OUT/gateways"
echo "gen-certs: done: $OUT"
