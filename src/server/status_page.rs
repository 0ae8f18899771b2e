//! `GET /`: a small self-contained status page for people. It reads `/status` every two
//! seconds; no external assets, so it works on an isolated network.

pub const PAGE: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>Contrail</title>
<style>
 body{font:15px/1.4 system-ui,sans-serif;margin:0;background:#0f172a;color:#e2e8f0}
 header{padding:18px 28px;background:#1e293b;display:flex;align-items:baseline;gap:16px}
 h1{margin:0;font-size:22px} .sub{color:#94a3b8}
 main{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:14px;padding:24px 28px}
 .card{background:#1e293b;border-radius:10px;padding:14px 16px}
 .k{color:#94a3b8;font-size:12px;text-transform:uppercase;letter-spacing:.06em}
 .v{font-size:26px;font-weight:600;margin-top:4px;font-variant-numeric:tabular-nums}
 .ok{color:#4ade80} .bad{color:#f87171} .warn{color:#fbbf24}
 footer{padding:0 28px 20px;color:#64748b;font-size:12px}
 a{color:#93c5fd}
</style></head><body>
<header><h1>Contrail</h1><span class="sub" id="role">…</span><span class="sub" id="ver"></span></header>
<main>
 <div class="card"><div class="k">Upstream</div><div class="v" id="up">…</div><div class="sub" id="url"></div></div>
 <div class="card"><div class="k">Ingest rate</div><div class="v" id="rate">…</div><div class="sub">events / s (last 2 s)</div></div>
 <div class="card"><div class="k">Upstream lag</div><div class="v" id="lag">…</div><div class="sub">behind upstream time</div></div>
 <div class="card"><div class="k">Relay seq</div><div class="v" id="seq">…</div><div class="sub" id="rc"></div></div>
 <div class="card"><div class="k">Subscribers</div><div class="v" id="subs">…</div></div>
 <div class="card"><div class="k">Log span</div><div class="v" id="span">…</div><div class="sub" id="spanr"></div></div>
 <div class="card"><div class="k">Log size</div><div class="v" id="disk">…</div></div>
 <div class="card"><div class="k">Uptime</div><div class="v" id="uptime">…</div></div>
</main>
<footer>Refreshes every 2 s from <a href="/status">/status</a>. Subscribe at <code>/subscribe</code>; metrics on the metrics listener at <code>/metrics</code>.</footer>
<script>
let prev=null;
const $=id=>document.getElementById(id);
const dur=s=>s<120?s.toFixed(0)+' s':s<7200?(s/60).toFixed(0)+' min':(s/3600).toFixed(1)+' h';
const bytes=b=>b<1e6?(b/1e3).toFixed(0)+' kB':b<1e9?(b/1e6).toFixed(1)+' MB':(b/1e9).toFixed(2)+' GB';
async function tick(){
 try{
  const s=await (await fetch('/status',{cache:'no-store'})).json(); const now=performance.now();
  $('role').textContent=s.role+(s.upstream?' of '+s.upstream:''); $('ver').textContent='v'+s.version;
  $('up').textContent=s.relay.connected?'connected':'disconnected'; $('up').className='v '+(s.relay.connected?'ok':'bad');
  $('url').textContent=s.relay.url||s.upstream||'';
  const r=prev?(s.ingest.events_total-prev.s.ingest.events_total)/((now-prev.t)/1000):s.ingest.events_per_second; $('rate').textContent=Math.max(0,r).toFixed(0);
  const lag=s.role=='replica'?s.replication_lag_seconds:s.relay.lag_seconds; $('lag').textContent=lag?(lag<120?lag.toFixed(1)+' s':dur(lag)):'–'; $('lag').className='v '+(lag>30?'bad':lag>5?'warn':'ok');
  $('seq').textContent=s.relay.seq||'–'; $('rc').textContent=s.relay.reconnects+' reconnects';
  $('subs').textContent=s.subscribers;
  const o=s.log.oldest_time_us,n=s.log.newest_time_us;
  $('span').textContent=o&&n?dur((n-o)/1e6):'empty'; $('spanr').textContent='retention '+dur(s.log.retention_seconds);
  $('disk').textContent=bytes(s.log.disk_bytes); $('uptime').textContent=dur(s.uptime_seconds);
  prev={s,t:now};
 }catch(e){$('up').textContent='unreachable';$('up').className='v bad';}
}
tick(); setInterval(tick,2000);
</script></body></html>
"##;
