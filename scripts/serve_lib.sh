# Sourced by the scripts that measure `lanner serve`: start one in the background, stop it.
# start_server TREE PORT LOG ARGS...: `lanner serve --port PORT ARGS...` run from inside TREE (so
# `python -m` imports that tree's lanner), its output in LOG, its pid in $server_pid; returns once
# /health answers, or 1 (with LOG's tail) if the server exits or $SERVER_WAIT_S (300) seconds pass.
start_server() {
  local tree=$1 port=$2 log=$3
  shift 3
  (cd "$tree" && exec python3 -m lanner.cli serve --port "$port" "$@") > "$log" 2>&1 &  # execs: $! is the server
  server_pid=$!
  for _ in $(seq "${SERVER_WAIT_S:-300}"); do
    curl -sf "localhost:$port/health" > /dev/null && return 0
    kill -0 "$server_pid" 2> /dev/null || break
    sleep 1
  done
  echo "server did not start"; tail -30 "$log"
  kill "$server_pid" 2> /dev/null; wait "$server_pid" 2> /dev/null  # not left holding the port
  return 1
}
# stop_server: SIGTERM, then wait; returns the server's exit code (0: a clean shutdown)
stop_server() { kill -TERM "$server_pid"; wait "$server_pid"; }
