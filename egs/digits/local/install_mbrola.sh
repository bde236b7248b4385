#!/usr/bin/env bash
# Install Debian's MBROLA and the MBROLA voices that egs/digits uses as recorded talkers
# (local/synth_corpus.py MBROLA_VOICES): diphone voices cut from recordings of real
# talkers, spoken through espeak-ng.
#
# Debian ships them in its contrib (mbrola) and non-free (the voices, each under its own
# terms: see /usr/share/doc/mbrola-*/copyright) areas, which many systems do not list.
# The system's apt sources are left alone: the packages are fetched through a private
# source list made from the system's own Debian mirror and release (`apt-get
# indextargets`), then installed as local .deb files.
#
# usage: local/install_mbrola.sh [package ...]   (default: mbrola and every voice used)
# Needs root for the install; as another user it prints what to run.
set -euo pipefail

# the keys of MBROLA_VOICES (tests/test_synth_mbrola.py checks that they agree)
voices="us1 us2 us3 en1 af1 de1 de2 de3 de4 de5 de6 fr1 fr4 gr2 hu1 nl2 pl1 ro1 sw1 sw2"
if [ $# -gt 0 ]; then pkgs="$*"; else pkgs="mbrola $(printf 'mbrola-%s ' $voices)"; fi

missing=""
for p in $pkgs; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" != 0 ]; then
  echo "missing Debian packages (contrib/non-free):$missing: run 'sudo $0', or enable" \
       "contrib and non-free in your apt sources and apt-get install$missing" >&2
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# the system's Debian mirror(s) and release (the suite without -updates / -security)
apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' 2>/dev/null |
  awk '$3 == "main" && $2 !~ /-/ {print "deb " $1 " " $2 " contrib non-free"}' | sort -u \
  > "$tmp/sources.list"
if [ ! -s "$tmp/sources.list" ]; then
  echo "install_mbrola.sh: no Debian main archive in the apt sources (apt-get indextargets):" \
       "install$missing by hand" >&2
  exit 1
fi
mkdir -p "$tmp/lists/partial" "$tmp/debs"
apt=(-o Dir::Etc::SourceList="$tmp/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o Dir::State::Lists="$tmp/lists" -o Debug::NoLocking=1)
# apt's download user (_apt) must reach the lists and the download folder
chmod 755 "$tmp" "$tmp/lists" "$tmp/debs" && chmod 700 "$tmp/lists/partial"
chown _apt "$tmp/lists/partial" "$tmp/debs" 2>/dev/null || true
apt-get "${apt[@]}" update -qq
(cd "$tmp/debs" && apt-get "${apt[@]}" -qq download $missing)
n=$(ls "$tmp/debs" | wc -l)
if [ "$n" -lt "$(echo $missing | wc -w)" ]; then
  echo "install_mbrola.sh: downloaded $n of the packages:$missing" >&2
  exit 1
fi
out=$(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$tmp"/debs/*.deb 2>&1) ||
  { echo "$out" >&2; echo "install_mbrola.sh: apt-get install of$missing failed" >&2; exit 1; }
echo "installed:$missing"
