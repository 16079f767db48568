"""`fuselm serve`: the uvicorn lifecycle around the app.

The socket is bound first and the model loads in a thread while uvicorn already answers
(/health says 503 until the engine runs), then the URL is printed. Ctrl-C / SIGTERM: uvicorn
stops accepting and requests in flight get GRACE_S seconds to finish; then the engine stops and
cancels the rest (their streams end with an error event and [DONE], the others get a 503), and
the command returns 0.
"""
import logging
import signal
import sys
import threading
import time

GRACE_S = 5
log = logging.getLogger("fuselm")


def kv_cache_memory(value):
    """--kv-cache-memory: bytes ("1000000"), a size ("512MiB") or a share of free memory ("0.5")."""
    if value is None:
        return None
    if value.isdigit():
        return int(value)
    try:
        return float(value)
    except ValueError:
        return value


def serve(model, host="127.0.0.1", port=8000, api_key=None, served_model_name=None, max_num_seqs=16,
          max_queue=256, kv_cache_memory=None, max_model_len=None, load_kwargs=None, verbose=False):
    """Serve `model` (a name or path) until SIGINT/SIGTERM; returns the exit status."""
    import uvicorn

    import fuselm
    from .app import ServerState, create_app

    if max_queue is not None and max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {max_queue}")
    state = ServerState([served_model_name or str(model)], api_key=api_key, max_queue=max_queue)
    config = uvicorn.Config(create_app(state), host=host, port=port, log_level="info" if verbose else "warning",
                            timeout_graceful_shutdown=GRACE_S + 5, lifespan="off")
    server = uvicorn.Server(config)
    sock = config.bind_socket()
    bound = sock.getsockname()[1]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{bound}"
    print(f"fuselm: loading {model}; listening on {url} (GET /health is 503 until it is loaded)", file=sys.stderr,
          flush=True)
    failed = []

    def load():
        try:
            m = fuselm.load(model, **(load_kwargs or {}))
            state.engine = m.engine(max_num_seqs=max_num_seqs, kv_cache_memory=kv_cache_memory,
                                    max_model_len=max_model_len).start()
        except Exception as e:  # noqa: BLE001 (reported, and the server stops)
            failed.append(e)
            print(f"fuselm: error: {e}", file=sys.stderr, flush=True)
            server.should_exit = True
            return
        print(f"fuselm: serving {state.names[0]!r} at {url}/v1 (OpenAI API; Ctrl-C to stop)", flush=True)

    done, stop_lock = threading.Event(), threading.Lock()

    def stop_engine():
        with stop_lock:
            if state.engine is not None and state.engine.running:
                state.engine.stop()

    def watch():  # after a stop signal: GRACE_S seconds for the requests in flight, then cancel them
        while not server.should_exit:
            time.sleep(0.1)
        if not done.wait(GRACE_S):
            stop_engine()

    # uvicorn re-raises the signal that stopped it once it is done, into the handlers it found: make
    # those no-ops, so the engine still stops cleanly after a SIGTERM.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    loader = threading.Thread(target=load, name="fuselm-load", daemon=True)
    loader.start()
    threading.Thread(target=watch, name="fuselm-shutdown", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        sock.close()
        done.set()
        stop_engine()
    print("fuselm: server stopped", file=sys.stderr, flush=True)
    return 2 if failed else 0
