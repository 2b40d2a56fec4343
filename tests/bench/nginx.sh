# Sourced by the benchmarks that run nginx as a peer. Needs $dir (a temporary
# directory the caller removes) and fail(). nginx_start 'SERVER' ['HTTP'] starts one
# nginx worker on a free loopback port, with the directives SERVER inside its server
# block (and HTTP, e.g. an upstream block, before it), in the background; sets nginx_pid and nginx_port once it accepts connections (the
# caller stops it). Logs and temporary files go under $dir.
NGINX=/usr/sbin/nginx
nginx_pid=""

nginx_start() {
    [ -x "$NGINX" ] || fail "$NGINX not found (Debian package nginx-light)"
    nginx_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])') || fail "cannot pick a free port"
    mkdir -p "$dir/logs"
    chmod -R a+rX "$dir"   # nginx workers run as nobody when started by root
    cat >"$dir/nginx.conf" <<EOC
daemon off;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/logs/error.log;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    ${2:-}
    server {
        listen 127.0.0.1:$nginx_port;
        $1
    }
}
EOC
    "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/logs/error.log" &
    nginx_pid=$!
    # Wait for nginx to answer (up to 5 s).
    python3 - "$nginx_port" <<'EOP' || { cat "$dir/logs/error.log" >&2; fail "nginx did not start"; }
import socket, sys, time
deadline = time.time() + 5
while True:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
        break
    except OSError:
        if time.time() > deadline:
            sys.exit(1)
        time.sleep(0.05)
EOP
}
