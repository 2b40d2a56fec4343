#!/bin/sh
# tests/tools/fake_claude.sh: a fake Claude Code CLI for the CLI agent specs. It
# prints the event shapes of `claude -p --output-format stream-json --verbose`
# (system/init, assistant text and tool_use, user tool_result, result) and does
# what a fresh-context iteration does: checks off the next box of SPEC.md.
#
#   fake_claude.sh MODE STATE_DIR [PROMPT]      (runs in the worktree)
#   MODE:
#     work       check off the next unchecked box of SPEC.md and append the item to
#                progress.txt; when no box is left unchecked, write a learning to
#                .ai/new-learnings.md
#     hang-once  the first call prints system/init, starts a child `sleep 1000`
#                (its pid in STATE_DIR/child.pid) and waits without output; later
#                calls work
#     hang       every call hangs like that
#     stuck      write .ai/stuck.md and exit
#     idle       print events, change nothing
#     fail       print an error result and exit 1
#   Every call: STATE_DIR/calls counts the calls; STATE_DIR/env.N holds the
#   environment of call N; STATE_DIR/prompt.N the prompt (argv PROMPT, else stdin).
set -u
mode=$1
state=$2
calls=$(( $(cat "$state/calls" 2>/dev/null || echo 0) + 1 ))
echo "$calls" >"$state/calls"
env >"$state/env.$calls"
if [ $# -ge 3 ]; then printf '%s' "$3" >"$state/prompt.$calls"; else cat >"$state/prompt.$calls"; fi

session="5f0c2a1e-0000-4000-8000-00000000000$calls"
# One JSON string: backslashes and quotes escaped (the items are single lines).
jstr() { printf '"%s"' "$(printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g')"; }

printf '{"type":"system","subtype":"init","cwd":%s,"session_id":"%s","tools":["Task","Bash","Glob","Grep","Read","Edit","Write","TodoWrite"],"mcp_servers":[],"model":"claude-sonnet-4-5-20250929","permissionMode":"bypassPermissions","slash_commands":["compact","review"],"apiKeySource":"ANTHROPIC_API_KEY","output_style":"default","uuid":"0a1b2c3d-0000-4000-8000-000000000001"}\n' \
  "$(jstr "$(pwd)")" "$session"

if [ "$mode" = hang ] || { [ "$mode" = hang-once ] && [ "$calls" -eq 1 ]; }; then
  sleep 1000 &
  echo $! >"$state/child.pid"
  wait
  exit 0
fi

assistant() { # $1: message id, $2: content JSON, $3: output tokens
  printf '{"type":"assistant","message":{"id":"%s","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[%s],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":4,"cache_creation_input_tokens":1200,"cache_read_input_tokens":800,"output_tokens":%s,"service_tier":"standard"}},"parent_tool_use_id":null,"session_id":"%s","uuid":"0a1b2c3d-0000-4000-8000-0000000000%02d"}\n' \
    "$1" "$2" "$3" "$session" "$calls"
}
tool_result() { # $1: tool_use id, $2: text
  printf '{"type":"user","message":{"role":"user","content":[{"tool_use_id":"%s","type":"tool_result","content":%s}]},"parent_tool_use_id":null,"session_id":"%s","uuid":"0a1b2c3d-0000-4000-8000-0000000001%02d"}\n' \
    "$1" "$(jstr "$2")" "$session" "$calls"
}
result() { # $1: subtype, $2: is_error, $3: result text
  printf '{"type":"result","subtype":"%s","is_error":%s,"duration_ms":2150,"duration_api_ms":1900,"num_turns":3,"result":%s,"session_id":"%s","total_cost_usd":0.0125,"usage":{"input_tokens":10,"cache_creation_input_tokens":1200,"cache_read_input_tokens":800,"output_tokens":90,"server_tool_use":{"web_search_requests":0},"service_tier":"standard"},"permission_denials":[],"uuid":"0a1b2c3d-0000-4000-8000-0000000002%02d"}\n' \
    "$1" "$2" "$(jstr "$3")" "$session" "$calls"
}

case $mode in
  stuck)
    mkdir -p .ai
    printf 'The objective needs the production database password; nobody gave it.\n' >.ai/stuck.md
    assistant msg_01stuck '{"type":"text","text":"I cannot continue: wrote .ai/stuck.md"}' 20
    result success false "Blocked: see .ai/stuck.md"
    exit 0 ;;
  idle)
    assistant msg_01idle '{"type":"text","text":"Looking around, changing nothing."}' 12
    result success false "Nothing done"
    exit 0 ;;
  fail)
    result error_during_execution true "API Error: 401 invalid x-api-key"
    exit 1 ;;
esac

item=$(grep -m 1 -E '^[[:space:]]*[-*] \[ \] ' SPEC.md | sed -E 's/^[[:space:]]*[-*] \[ \] //')
assistant "msg_01a$calls" "{\"type\":\"text\",\"text\":$(jstr "Next unchecked item: $item")}" 25
assistant "msg_01b$calls" "{\"type\":\"tool_use\",\"id\":\"toolu_01edit$calls\",\"name\":\"Edit\",\"input\":{\"file_path\":$(jstr "$(pwd)/SPEC.md"),\"old_string\":\"- [ ] \",\"new_string\":\"- [x] \"}}" 40
awk '!done && /^[[:space:]]*[-*] \[ \] / { sub(/\[ \]/, "[x]"); done = 1 } { print }' SPEC.md >SPEC.md.tmp && mv SPEC.md.tmp SPEC.md
echo "$item" >>progress.txt
tool_result "toolu_01edit$calls" "The file SPEC.md has been updated."
if ! grep -q -E '^[[:space:]]*[-*] \[ \] ' SPEC.md; then
  mkdir -p .ai
  printf -- '- The calc tests run with `make -s test` from the repository root\n\n- progress.txt lists the finished items\n' >>.ai/new-learnings.md
fi
result success false "Checked off: $item"
