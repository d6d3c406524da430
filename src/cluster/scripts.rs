//! The Lua scripts the cluster store runs (public for the tests, which drive them
//! directly in the address-flood measurement): each decision is one atomic script call, with
//! Redis's own clock (`TIME`), so the gates' clocks never have to agree. Every key a
//! script writes gets a TTL, so an address flood leaves nothing behind once it stops.

use std::sync::LazyLock;

use redis::Script;

/// The upgrade: the per-IP upgrade rate (GCRA) and, if it passes, a lease under the per-IP
/// cap, in one round trip.
///
/// KEYS[1] the rate key, KEYS[2] the per-IP lease set. ARGV: the emission interval in µs,
/// the burst, the lease's member, the cap, the lease in ms, `1` to take the lease even
/// when the rate fails (report mode).
/// Returns `{rate_ok (1/0), retry_after_us, leased (1/0)}`.
pub static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
local retry = 0
if allow_at > now then
  retry = allow_at - now
else
  local ttl = math.max(1, math.ceil((new_tat - now) / 1000))
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl)
end
local rate_ok = 1
if retry > 0 then
  rate_ok = 0
  if ARGV[6] ~= '1' then return {0, retry, 0} end
end
local now_ms = math.floor(now / 1000)
local lease = tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return {rate_ok, retry, 0} end
redis.call('ZADD', KEYS[2], now_ms + lease, ARGV[3])
redis.call('PEXPIRE', KEYS[2], lease)
return {rate_ok, retry, 1}
",
    )
});

/// A lease under a cap (the per-subject cap). KEYS[1] the lease set; ARGV: the member,
/// the cap, the lease in ms. Returns 1 when leased, 0 when the cap is full.
pub static LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now_ms + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[1], lease)
return 1
",
    )
});

/// Renew (or, after the store lost them, re-register) this gate's leases. KEYS: the lease
/// sets; ARGV[1] the lease in ms, then one member per key. Returns how many were renewed.
pub static REFRESH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now_ms + lease, ARGV[i + 1])
  redis.call('PEXPIRE', key, lease)
end
return #KEYS
",
    )
});
