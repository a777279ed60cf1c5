# Sourced by the device run scripts: install the wheels staged in ./.whl (README, "GPU machines
# without network") into /tmp/qg-site once per machine and put it on PYTHONPATH. Several runs
# may start at once (one per GPU): a lock serialises them and a stamp of the wheel set lets the
# later ones reuse the first install instead of deleting files the others are importing.
if compgen -G ".whl/*.whl" >/dev/null; then
  stamp=$(ls -l .whl/*.whl | awk '{print $5, $NF}' | sha256sum | cut -c1-16)
  (
    flock 9
    if [ "$(cat /tmp/qg-site/.stamp 2>/dev/null)" != "$stamp" ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/qg-site .whl/*.whl \
        && echo "$stamp" > /tmp/qg-site/.stamp
    fi
  ) 9>/tmp/qg-site.lock || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/qg-site${PYTHONPATH:+:$PYTHONPATH}
fi
