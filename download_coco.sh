#!/usr/bin/env bash
# Download MS-COCO 2014 for captioning: train2014/, val2014/ and the caption annotations.
#
#   ./download_coco.sh [DEST]            (default DEST: data_dir/coco)
#
# Environment:
#   COCO_MIRROR    base URL (default http://images.cocodataset.org); files are fetched from
#                  $COCO_MIRROR/zips/{train,val}2014.zip and
#                  $COCO_MIRROR/annotations/annotations_trainval2014.zip
#   KEEP_ZIPS=1    keep the zips after a good extraction (default: delete them)
#   WITH_KARPATHY=1  also fetch Karpathy's split file (dataset_coco.json) from KARPATHY_URL
#   KARPATHY_URL   a .zip holding dataset_coco.json, or the .json itself
#   COCO_CONNECT_TIMEOUT  seconds to connect (default 30)
#   COCO_HEAD_TIMEOUT     seconds for a header check to answer (default 30)
#   COCO_STALL_SECONDS    a download slower than COCO_MIN_SPEED bytes/s (default 1000) for this
#                         long (default 60) has stalled: curl gives up (and retries COCO_RETRIES
#                         times, default 3)
#
# Safe to re-run: partial downloads resume, every zip is tested before it is extracted,
# and finished steps are skipped (a re-run with everything in place downloads nothing).
set -euo pipefail

DEST="${1:-data_dir/coco}"
COCO_MIRROR="${COCO_MIRROR:-http://images.cocodataset.org}"
COCO_MIRROR="${COCO_MIRROR%/}"
KARPATHY_URL="${KARPATHY_URL:-https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip}"

CONNECT_TIMEOUT="${COCO_CONNECT_TIMEOUT:-30}"
HEAD_TIMEOUT="${COCO_HEAD_TIMEOUT:-30}"
STALL_SECONDS="${COCO_STALL_SECONDS:-60}"
MIN_SPEED="${COCO_MIN_SPEED:-1000}"
RETRIES="${COCO_RETRIES:-3}"

die() { echo "download_coco.sh: error: $*" >&2; exit 1; }
say() { echo "download_coco.sh: $*"; }

for tool in curl unzip df; do
  command -v "$tool" >/dev/null 2>&1 || die "'$tool' is required but not installed"
done
mkdir -p "$DEST" || die "cannot create $DEST"
DEST="$(cd "$DEST" && pwd)"

# name | url | what the extraction must produce
STEPS=(
  "annotations_trainval2014.zip|$COCO_MIRROR/annotations/annotations_trainval2014.zip|annotations/captions_train2014.json"
  "train2014.zip|$COCO_MIRROR/zips/train2014.zip|train2014"
  "val2014.zip|$COCO_MIRROR/zips/val2014.zip|val2014"
)
# fallback sizes in MB (zip + extracted), used when the server does not say
declare -A FALLBACK_MB=([annotations_trainval2014.zip]=1000 [train2014.zip]=27000 [val2014.zip]=13300)

done_marker() { echo "$DEST/.done-${1%.zip}"; }

head_info() {  # "STATUS BYTES" of the final response to a HEAD request (either may be empty); 28: no answer
  local headers rc=0
  headers=$(curl -sSIL --connect-timeout "$CONNECT_TIMEOUT" --max-time "$HEAD_TIMEOUT" "$1" 2>/dev/null) || rc=$?
  [ "$rc" -ne 28 ] || return 28
  printf '%s\n' "$headers" | tr -d '\r' |
    awk 'toupper($1) ~ /^HTTP\// {code=$2; n=""} tolower($1)=="content-length:" {n=$2} END {print code, n}' || true
}

# --- 1. every file still needed is on the mirror, and there is disk space for it ---
need_mb=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r name url product <<<"$step"
  [ -f "$(done_marker "$name")" ] && [ -e "$DEST/$product" ] && continue
  info=$(head_info "$url") ||
    die "$url: no answer within ${HEAD_TIMEOUT}s, the mirror stalls (set COCO_MIRROR to another mirror, or COCO_HEAD_TIMEOUT for a slow one)"
  read -r code bytes <<<"$info"
  case "$code" in  # a dead link fails now, not after the other downloads (403: S3's answer for a missing key)
    403|404|410)
      msg="$url: HTTP $code, the file is not on the mirror (a dead link? set COCO_MIRROR to another mirror)"
      [ -f "$DEST/$name" ] || die "$msg"
      say "warning: $msg; trying the $name already here" ;;
  esac
  mb=""
  if [ "$code" = "200" ] && [ -n "$bytes" ]; then mb=$(( (bytes + 1048575) / 1048576 )); fi
  if [ -n "$mb" ]; then
    have=0
    [ -f "$DEST/$name" ] && have=$(( $(stat -c %s "$DEST/$name") / 1048576 ))
    need_mb=$(( need_mb + 2 * mb - have ))   # the rest of the zip + its extracted contents
  else
    need_mb=$(( need_mb + FALLBACK_MB[$name] ))
  fi
done
free_mb=$(( $(df -Pk "$DEST" | awk 'NR==2 {print $4}') / 1024 ))
if [ "$need_mb" -gt 0 ]; then
  say "need about ${need_mb} MB in $DEST, ${free_mb} MB free"
  [ "$free_mb" -ge "$need_mb" ] || die "not enough disk space in $DEST: need about ${need_mb} MB, have ${free_mb} MB"
fi

# --- 2. download (resumable), test, extract, clean up ---
fetch() {  # url file: resumes a partial file; restarts it when it cannot be resumed
  say "downloading $1"
  local rc=0 code=""
  # --fail: an HTTP error is an error, not a saved error page; -C -: continue a partial file;
  # no data for STALL_SECONDS (under MIN_SPEED bytes/s): a stalled mirror, given up on
  local opts=(--fail --location --retry "$RETRIES" --retry-delay 2 --connect-timeout "$CONNECT_TIMEOUT"
              --speed-limit "$MIN_SPEED" --speed-time "$STALL_SECONDS" --progress-bar)
  code=$(curl "${opts[@]}" -C - -w '%{http_code}' -o "$2" "$1") || rc=$?
  # 33/36: the server does not do ranges; 22 with 416: the local file is not a prefix of the
  # remote one (as big or bigger, e.g. a complete but corrupt download), so resuming cannot work
  if [ "$rc" -eq 33 ] || [ "$rc" -eq 36 ] || { [ "$rc" -eq 22 ] && [ "$code" = "416" ]; }; then
    say "cannot resume ${2##*/}; downloading $1 again from the start"
    rm -f "$2"
    rc=0
    curl "${opts[@]}" -o "$2" "$1" || rc=$?
  fi
  case "$rc" in
    0) ;;
    23) die "cannot write $2 (curl exit 23): a local disk problem (full? read-only? permissions?), not the mirror's; fix it and re-run to resume" ;;
    28) die "download stalled: $1 sent under ${MIN_SPEED} bytes/s for ${STALL_SECONDS}s (curl exit 28); re-run to resume, or set COCO_MIRROR to another mirror" ;;
    *) die "download failed (curl exit $rc): $1 (re-run to resume; set COCO_MIRROR for another mirror)" ;;
  esac
}

for step in "${STEPS[@]}"; do
  IFS='|' read -r name url product <<<"$step"
  marker="$(done_marker "$name")"
  if [ -f "$marker" ] && [ -e "$DEST/$product" ]; then
    say "$name: already extracted, skipping"
    continue
  fi
  zip="$DEST/$name"
  if [ -f "$zip" ] && unzip -tq "$zip" >/dev/null 2>&1; then
    say "$name: already downloaded"
  else
    fetch "$url" "$zip"
  fi
  say "testing $name"
  unzip -tq "$zip" >/dev/null 2>&1 || {
    mv -f "$zip" "$zip.corrupt"
    die "$name is corrupt (moved to $zip.corrupt); re-run to download it again"
  }
  say "extracting $name"
  unzip -q -o "$zip" -d "$DEST" || die "extracting $name failed"
  [ -e "$DEST/$product" ] || die "$name did not contain the expected $product"
  touch "$marker"
  if [ "${KEEP_ZIPS:-0}" != "1" ]; then rm -f "$zip"; fi
done

# --- 3. optional: Karpathy's split (5k val / 5k test images inside val2014) ---
if [ "${WITH_KARPATHY:-0}" = "1" ]; then
  if [ -f "$DEST/dataset_coco.json" ]; then
    say "dataset_coco.json: already present, skipping"
  else
    case "$KARPATHY_URL" in
      *.json) fetch "$KARPATHY_URL" "$DEST/dataset_coco.json.part" && mv "$DEST/dataset_coco.json.part" "$DEST/dataset_coco.json" ;;
      *)
        kzip="$DEST/caption_datasets.zip"
        if [ -f "$kzip" ] && unzip -tq "$kzip" >/dev/null 2>&1; then
          say "caption_datasets.zip: already downloaded"
        else
          fetch "$KARPATHY_URL" "$kzip"
        fi
        unzip -tq "$kzip" >/dev/null 2>&1 || {
          mv -f "$kzip" "$kzip.corrupt"
          die "caption_datasets.zip is corrupt (moved to $kzip.corrupt); re-run to download it again"
        }
        unzip -q -o -j "$DEST/caption_datasets.zip" dataset_coco.json -d "$DEST" || die "no dataset_coco.json in $KARPATHY_URL"
        if [ "${KEEP_ZIPS:-0}" != "1" ]; then rm -f "$DEST/caption_datasets.zip"; fi ;;
    esac
  fi
fi

say "done: $DEST/{train2014,val2014,annotations/captions_{train,val}2014.json}"
