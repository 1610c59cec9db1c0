#!/usr/bin/env bash
# The shell-script baseline users run today: one curl per hourly window, run in
# parallel with xargs -P, then the parts glued with tail -n +2 under one header.
#
#   bench/baseline.sh --start ISO --end ISO --output FILE
#       [--concurrency N] [--compression gzip|none] [--columns A,B,...]
#       [--format csv|tsv] [--parts DIR] [--discard | --write-only [--no-sync]]
#
# Credentials come from SFMC_CLIENT_ID, SFMC_CLIENT_SECRET and SFMC_AUTH_URL, as for
# journey-export. The token is fetched once. Each window is a POST of the download
# call with x-direct-pipe: true and the JSON body {"start": ..., "end": ...}.
# --compression gzip asks for gzip (curl --compressed decodes it); none asks for
# nothing, so the server answers identity. --discard writes every body to
# /dev/null and prints the bytes received: the raw serving rate, nothing glued.
# --write-only writes each body to its part file, syncs the parts to disk (unless
# --no-sync) and deletes them, nothing glued: what writing the bytes costs here.
set -euo pipefail

start="" end="" output="" concurrency=4 compression=gzip format=csv parts="" discard=0
write_only=0 sync_parts=1
columns="TransactionTime,ContactKey,Status,DefinitionId,DefinitionName,ActivityId,ActivityName,ActivityType"
while [ $# -gt 0 ]; do
    case "$1" in
        --start) start=$2; shift 2 ;;
        --end) end=$2; shift 2 ;;
        --output) output=$2; shift 2 ;;
        --concurrency) concurrency=$2; shift 2 ;;
        --compression) compression=$2; shift 2 ;;
        --columns) columns=$2; shift 2 ;;
        --format) format=$2; shift 2 ;;
        --parts) parts=$2; shift 2 ;;
        --discard) discard=1; shift ;;
        --write-only) write_only=1; shift ;;
        --no-sync) sync_parts=0; shift ;;
        *) echo "baseline.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
: "${SFMC_CLIENT_ID:?}" "${SFMC_CLIENT_SECRET:?}" "${SFMC_AUTH_URL:?}"
if [ -z "$start" ] || [ -z "$end" ] || { [ -z "$output" ] && [ "$discard" = 0 ]; }; then
    echo "baseline.sh: --start, --end and --output (or --discard) are required" >&2
    exit 2
fi

# 1. One token for every window.
grant=$(printf '{"grant_type":"client_credentials","client_id":"%s","client_secret":"%s"}' \
    "$SFMC_CLIENT_ID" "$SFMC_CLIENT_SECRET")
answer=$(curl -sS --fail -X POST -H 'Content-Type: application/json' \
    -d "$grant" "$SFMC_AUTH_URL/v2/token")
TOKEN=$(printf '%s' "$answer" | sed -n 's/.*"access_token": *"\([^"]*\)".*/\1/p')
REST=$(printf '%s' "$answer" | sed -n 's/.*"rest_instance_url": *"\([^"]*\)".*/\1/p')
URL="${REST%/}/interaction/v1/interactions/journeyhistory/download?format=$format&columns=$columns"
export TOKEN URL COMPRESSION=$compression

# 2. The windows: one line "START END" per hour, times as the API writes them.
first=$(date -u -d "$start" +%s)
last=$(date -u -d "$end" +%s)
windows=$(seq "$first" 3600 $((last - 1)) | while read -r t; do
    printf '@%s\n@%s\n' "$t" $((t + 3600 < last ? t + 3600 : last))
done | date -u -f - +%Y-%m-%dT%H:%M:%S.000Z | paste -d ' ' - -)

# 3. Download every window, N at a time: "$0 $1" are its start and end; TARGET is
# where its body goes, with {} standing for the start.
fetch='s=$0 e=$1
if [ "$COMPRESSION" = gzip ]; then set -- --compressed -H "Accept-Encoding: gzip"
else set --; fi
case $TARGET in *{}*) out=${TARGET%%{\}*}$s${TARGET#*{\}} ;; *) out=$TARGET ;; esac
curl -sS --fail "$@" -X POST -o "$out" \
    -w "%{size_download}\n" -H "Authorization: Bearer $TOKEN" \
    -H "x-direct-pipe: true" -H "Content-Type: application/json" \
    -d "{\"start\":\"$s\",\"end\":\"$e\"}" "$URL"'
if [ "$discard" = 1 ]; then
    printf '%s\n' "$windows" | TARGET=/dev/null xargs -P "$concurrency" -n 2 \
        sh -c "$fetch" | awk '{ total += $1 } END { print total + 0 }'
    exit 0
fi
parts=${parts:-$output.parts.d}
mkdir -p "$parts"
printf '%s\n' "$windows" | TARGET="$parts/{}.$format" xargs -P "$concurrency" -n 2 \
    sh -c "$fetch" > /dev/null

if [ "$write_only" = 1 ]; then
    if [ "$sync_parts" = 1 ]; then sync -- "$parts"/*."$format"; fi
    rm -rf "$parts"
    exit 0
fi
# 4. Glue: the first part's header once, then every part without its header, in
# window order (the names sort by time).
set -- "$parts"/*."$format"
head -n 1 "$1" > "$output"
tail -q -n +2 "$@" >> "$output"
rm -rf "$parts"
