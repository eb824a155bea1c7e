# Sourced by the bench scripts from the repository root: $PY, PYTHONPATH for the repo's packages, and
# the router's dependencies the GPU image lacks, installed from the carried wheels (.whl/) into /tmp/site.
PY=${PY:-python3}
export PYTHONPATH=server:proto:router:launcher:bench${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ls .whl/*.whl > /dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl 2> /dev/null \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
