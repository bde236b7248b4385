# Put pkwrap's Kaldi-named command-line tools (scripts/) first on PATH, like Kaldi's path.sh.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PATH="$root/scripts:$PATH"
export PYTHONUNBUFFERED=1
