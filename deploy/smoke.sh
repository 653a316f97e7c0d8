#!/usr/bin/env bash
# CloudChat smoke test: run it after deploying, against the address visitors use.
#
#   deploy/smoke.sh https://example.com/cloudchat
#
# Walks through the API as a new user would (health, register, login, me, a chat stream,
# reset chat, logout, and a password reset when the server hands out debug tokens) and
# prints one line per step. Exits 1 at the first failing step and names it. Needs bash and
# curl only. It registers one account, smoke-<random>@example.com (SMOKE_EMAIL_DOMAIN
# changes the domain); a welcome mail and a reset mail are sent there.
set -euo pipefail

if [[ $# -ne 1 || $1 == -* ]]; then
    echo "usage: $0 BASE_URL   (e.g. https://example.com/cloudchat)" >&2
    exit 2
fi
base=${1%/}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
jar=$work/cookies
rand=$(printf '%04x%04x%04x%04x' $RANDOM $RANDOM $RANDOM $RANDOM)
email="smoke-$rand@${SMOKE_EMAIL_DOMAIN:-example.com}"
password="Pw-$rand-1x-smoke"
new_password="Pw-$rand-2y-smoke"
step_name=""
status=""
body=""

step() { step_name=$1; }

pass() {
    if [[ -n ${1:-} ]]; then
        printf 'ok    %-16s %s\n' "$step_name" "$1"
    else
        printf 'ok    %s\n' "$step_name"
    fi
}

fail() {
    printf 'FAIL  %-16s %s\n' "$step_name" "$1"
    echo "smoke test failed at step: $step_name" >&2
    exit 1
}

# request METHOD PATH [JSON]: sets $status and $body; cookies kept in $jar.
request() {
    local args=(-sS -X "$1" -o "$work/body" -w '%{http_code}' -b "$jar" -c "$jar" --max-time 30)
    if [[ $# -ge 3 ]]; then
        args+=(-H 'Content-Type: application/json' --data-binary "$3")
    fi
    status=$(curl "${args[@]}" "$base$2" 2>"$work/err") || status="000"
    body=$(cat "$work/body" 2>/dev/null || true)
    if [[ $status == 000 ]]; then
        body="curl: $(tr '\n' ' ' <"$work/err")"
    fi
}

expect() {
    local want=$1
    if [[ $status != "$want" ]]; then
        fail "HTTP $status, expected $want: ${body:0:300}"
    fi
    if [[ $want == 2* ]] && ! grep -Eq '"ok" ?: ?true' <<<"$body"; then
        fail "HTTP $status without \"ok\": true: ${body:0:300}"
    fi
}

step healthz
request GET /auth/healthz
expect 200
pass "$body"

step no-cache
request GET /test
first=$body
request GET /test
if [[ $status != 200 || $body == "$first" || $body != *request_id* ]]; then
    fail "two GET /test answers should differ (is something caching?): $first / $body"
fi
pass "GET /test answered afresh twice"

step register
request POST /auth/register "{\"email\": \"$email\", \"password\": \"$password\"}"
expect 201
pass "$email"

step login
request POST /auth/login "{\"identifier\": \"$email\", \"password\": \"$password\"}"
expect 200
pass "session cookie set"

step me
request GET /auth/me
expect 200
[[ $body == *"\"$email\""* ]] || fail "answer does not name $email: ${body:0:300}"
pass "logged in as $email"

step chat
request POST /deepseek_chat '{"message": "Hello from the smoke test"}'
if [[ $status != 200 ]]; then
    fail "HTTP $status, expected 200: ${body:0:300}"
fi
if ! grep -q '^{"text"' <<<"$body"; then
    fail "no {\"text\": ...} line in the stream: ${body:0:300}"
fi
if grep -q '^{"error"' <<<"$body"; then
    fail "the stream ended with an error: $(grep '^{"error"' <<<"$body")"
fi
pass "$(grep -c '^{"text"' <<<"$body") text line(s)"

step reset_chat
request POST /reset_chat '{}'
expect 200
pass

step logout
request POST /auth/logout '{}'
expect 200
pass

step me-after-logout
request GET /auth/me
[[ $status == 401 ]] || fail "HTTP $status, expected 401: ${body:0:300}"
pass "401 as expected"

step forgot
request POST /auth/password/forgot "{\"identifier\": \"$email\"}"
expect 200
token=$(sed -n 's/.*"debug_token" *: *"\([^"]*\)".*/\1/p' <<<"$body")
if [[ -z $token ]]; then
    pass "no debug_token (as in production): reset steps skipped"
    echo "smoke test passed"
    exit 0
fi
pass "debug_token received"

step reset
request POST /auth/password/reset "{\"token\": \"$token\", \"password\": \"$new_password\"}"
expect 200
pass

step login-new
request POST /auth/login "{\"identifier\": \"$email\", \"password\": \"$new_password\"}"
expect 200
request GET /auth/me
expect 200
pass "the new password works"

step logout-new
request POST /auth/logout '{}'
expect 200
pass

echo "smoke test passed"
