# Sourced by the measuring scripts: ../shared/data (or $SHARED_DATA), GPT-2's BPE files from there, and a
# scratch directory that is removed on exit, made the current directory. Sets $repo, $shared and $work.
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
shared="${SHARED_DATA:-$repo/../shared/data}"
export LORA_CLI_BPE_DIR="${LORA_CLI_BPE_DIR:-$shared/gpt2_bpe}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
