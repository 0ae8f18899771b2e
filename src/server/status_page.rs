//! `GET /`: a small self-contained status page for people. It reads `/status` every two
//! seconds and `/status/history` every five, and draws the last hour as inline SVG charts;
//! no external scripts, fonts or styles, so it works on an isolated network.

pub const PAGE: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>Contrail</title>
<style>
 body{font:15px/1.4 system-ui,sans-serif;margin:0;background:#0f172a;color:#e2e8f0}
 header{padding:18px 28px;background:#1e293b;display:flex;align-items:baseline;gap:16px;flex-wrap:wrap}
 h1{margin:0;font-size:22px} h2{font-size:14px;color:#94a3b8;text-transform:uppercase;letter-spacing:.08em;margin:8px 28px 0}
 .sub{color:#94a3b8}
 .grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:14px;padding:14px 28px}
 .charts{grid-template-columns:repeat(auto-fill,minmax(330px,1fr))}
 .card{background:#1e293b;border-radius:10px;padding:14px 16px}
 .k{color:#94a3b8;font-size:12px;text-transform:uppercase;letter-spacing:.06em}
 .v{font-size:26px;font-weight:600;margin-top:4px;font-variant-numeric:tabular-nums}
 .v2{font-size:18px;font-weight:600;margin:2px 0 6px;font-variant-numeric:tabular-nums}
 .ok{color:#4ade80} .bad{color:#f87171} .warn{color:#fbbf24}
 svg{width:100%;height:90px;display:block} .axis{color:#64748b;font-size:11px;display:flex;justify-content:space-between}
 .legend span{margin-right:10px;font-size:12px} .legend i{display:inline-block;width:10px;height:3px;margin-right:4px;vertical-align:middle}
 table{width:100%;border-collapse:collapse;font-size:13px} td{padding:2px 0} td.n{text-align:right;font-variant-numeric:tabular-nums;color:#cbd5e1}
 .bar{height:6px;background:#38bdf8;border-radius:3px}
 #banner{display:none;margin:14px 28px 0;padding:10px 14px;border-radius:8px;background:#7f1d1d;color:#fee2e2}
 footer{padding:6px 28px 20px;color:#64748b;font-size:12px}
 a{color:#93c5fd}
</style></head><body>
<header><h1>Contrail</h1><span class="sub" id="role">…</span><span class="sub" id="ver"></span><span class="sub" id="ready"></span></header>
<div id="banner"></div>
<div class="grid">
 <div class="card"><div class="k">Upstream</div><div class="v" id="up">…</div><div class="sub" id="url"></div></div>
 <div class="card"><div class="k">Ingest rate</div><div class="v" id="rate">…</div><div class="sub">events / s (last sample)</div></div>
 <div class="card"><div class="k">Upstream lag</div><div class="v" id="lag">…</div><div class="sub">behind upstream time</div></div>
 <div class="card"><div class="k">Relay seq</div><div class="v" id="seq">…</div><div class="sub" id="rc"></div></div>
 <div class="card"><div class="k">Subscribers</div><div class="v" id="subs">…</div><div class="sub" id="subsw"></div></div>
 <div class="card"><div class="k">Log span</div><div class="v" id="span">…</div><div class="sub" id="spanr"></div></div>
 <div class="card"><div class="k">Log size</div><div class="v" id="disk">…</div></div>
 <div class="card" id="catchcard" style="display:none"><div class="k">Replica catch-up</div><div class="v" id="catch">…</div><div class="sub" id="eta"></div></div>
 <div class="card"><div class="k">Uptime</div><div class="v" id="uptime">…</div></div>
</div>
<h2>The last hour</h2>
<div class="grid charts">
 <div class="card chart" id="c-ingest"></div>
 <div class="card chart" id="c-delivered"></div>
 <div class="card chart" id="c-lag"></div>
 <div class="card chart" id="c-subs"></div>
 <div class="card chart" id="c-drops"></div>
 <div class="card chart" id="c-span"></div>
</div>
<h2>Event mix, last minute</h2>
<div class="grid charts">
 <div class="card"><div class="k">Kinds</div><table id="kinds"></table></div>
 <div class="card"><div class="k">Busiest collections</div><table id="colls"></table></div>
</div>
<footer>Refreshes itself from <a href="/status">/status</a> and <a href="/status/history">/status/history</a>. Subscribe at <code>/subscribe</code>; metrics on the metrics listener at <code>/metrics</code>.</footer>
<div id="errors" hidden></div>
<script>
const $=id=>document.getElementById(id);
const errors=[]; window.addEventListener('error',e=>{errors.push(String(e.message));$('errors').textContent=errors.join('\n');});
const esc=s=>String(s).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
const dur=s=>s<120?s.toFixed(0)+' s':s<7200?(s/60).toFixed(0)+' min':(s/3600).toFixed(1)+' h';
const bytes=b=>b<1e6?(b/1e3).toFixed(0)+' kB':b<1e9?(b/1e6).toFixed(1)+' MB':(b/1e9).toFixed(2)+' GB';
const num=v=>v>=1e6?(v/1e6).toFixed(1)+'M':v>=1e4?(v/1e3).toFixed(0)+'k':v>=100?v.toFixed(0):v>=10?v.toFixed(1):v.toFixed(2);
const COLORS=['#38bdf8','#a78bfa','#f472b6','#fbbf24','#4ade80','#f87171'];
// One chart: series of {name, values}; draws a line per series over the sample times.
function chart(id,title,unit,series,times,fmt){
 const el=$(id), W=320, H=90, P=3, n=times.length;
 const max=Math.max(1e-9,...series.flatMap(s=>s.values));
 const x=i=>P+(W-2*P)*(n<2?1:i/(n-1)), y=v=>H-P-(H-2*P)*(v/max);
 let svg=`<svg viewBox="0 0 ${W} ${H}" preserveAspectRatio="none"><line x1="0" y1="${H-P}" x2="${W}" y2="${H-P}" stroke="#334155"/>`;
 series.forEach((s,k)=>{const pts=s.values.map((v,i)=>x(i).toFixed(1)+','+y(v).toFixed(1)).join(' ');
  svg+=`<polyline class="series" fill="none" stroke="${COLORS[k%COLORS.length]}" stroke-width="1.6" points="${pts}"/>`;});
 svg+='</svg>';
 const last=series.map(s=>s.values.length?s.values[s.values.length-1]:0).reduce((a,b)=>a+b,0);
 const legend=series.length>1?'<div class="legend">'+series.map((s,k)=>`<span><i style="background:${COLORS[k%COLORS.length]}"></i>${esc(s.name)}</span>`).join('')+'</div>':'';
 const span=n>1?dur((times[n-1]-times[0])/1000):'–';
 el.innerHTML=`<div class="k">${esc(title)}</div><div class="v2">${(fmt||num)(last)} ${unit}</div>${svg}<div class="axis"><span>${span} ago</span><span>max ${(fmt||num)(max)}</span><span>now</span></div>${legend}`;
 el.dataset.points=n;
}
async function history(){
 try{
  const h=await (await fetch('/status/history',{cache:'no-store'})).json();
  const t=h.map(s=>s.time_ms), col=f=>h.map(f);
  if(h.length) $('rate').textContent=h[h.length-1].ingest_per_second.toFixed(0);
  chart('c-ingest','Ingest','events/s',[{name:'ingest',values:col(s=>s.ingest_per_second)}],t);
  chart('c-delivered','Delivered','events/s',[{name:'delivered',values:col(s=>s.delivered_per_second)}],t);
  chart('c-lag','Upstream lag','',[{name:'lag',values:col(s=>Math.max(0,s.lag_seconds))},{name:'upstream ahead',values:col(s=>s.upstream_ahead_seconds)}],t,v=>v<10?v.toFixed(2)+' s':dur(v));
  const wires=[...new Set(h.flatMap(s=>Object.entries(s.subscribers).flatMap(([w,c])=>Object.keys(c).map(k=>w+' '+k))))];
  chart('c-subs','Subscribers','',wires.map(wk=>{const [w,k]=wk.split(' ');return {name:wk,values:col(s=>(s.subscribers[w]||{})[k]||0)};}),t,v=>v.toFixed(0));
  const reasons=[...new Set(h.flatMap(s=>Object.keys(s.drops_per_second)))];
  chart('c-drops','Drops','/s',reasons.length?reasons.slice(0,5).map(r=>({name:r,values:col(s=>s.drops_per_second[r]||0)})):[{name:'none',values:col(()=>0)}],t);
  chart('c-span','Log span','',[{name:'span',values:col(s=>s.log_span_seconds)}],t,dur);
 }catch(e){errors.push('history: '+e);$('errors').textContent=errors.join('\n');}
}
function rows(el,list,max){$(el).innerHTML=list.map(([k,v])=>`<tr><td>${esc(k)}<div class="bar" style="width:${max?Math.max(2,100*v/max):0}%"></div></td><td class="n">${v}</td></tr>`).join('')||'<tr><td class="sub">nothing yet</td></tr>';}
let prev=null;
async function tick(){
 try{
  const s=await (await fetch('/status',{cache:'no-store'})).json(); const now=performance.now();
  $('role').textContent=s.role+(s.upstream?' of '+s.upstream:''); $('ver').textContent='v'+s.version;
  $('ready').textContent=s.ready?'ready':'not ready'; $('ready').className=s.ready?'ok':'bad';
  $('banner').style.display=s.ready?'none':'block'; $('banner').textContent=s.ready?'':'Not ready: '+(s.not_ready_reason||'');
  $('up').textContent=s.relay.connected?'connected':'disconnected'; $('up').className='v '+(s.relay.connected?'ok':'bad');
  $('url').textContent=s.relay.url||s.upstream||'';
  if(!prev) $('rate').textContent=s.ingest.events_per_second.toFixed(0);
  const lag=s.role=='replica'?s.replication_lag_seconds:s.relay.lag_seconds; $('lag').textContent=lag?(lag<120?lag.toFixed(1)+' s':dur(lag)):'–'; $('lag').className='v '+(lag>30?'bad':lag>5?'warn':'ok');
  $('seq').textContent=s.relay.seq||'–'; $('rc').textContent=s.relay.reconnects+' reconnects';
  $('subs').textContent=s.subscribers; $('subsw').textContent=Object.entries(s.subscribers_by_wire||{}).map(([w,c])=>w+': '+Object.entries(c).map(([k,n])=>n+' '+k).join(', ')).join(' · ');
  const o=s.log.oldest_time_us,n=s.log.newest_time_us;
  $('span').textContent=o&&n?dur((n-o)/1e6):'empty'; $('spanr').textContent='retention '+dur(s.log.retention_seconds)+(s.log.holes?' · '+s.log.holes+(s.log.holes>1?' holes':' hole')+' (events never received)':'');
  $('disk').textContent=bytes(s.log.disk_bytes); $('uptime').textContent=dur(s.uptime_seconds);
  if(s.catchup){$('catchcard').style.display='block'; $('catch').textContent=s.catchup.behind_seconds>1?dur(s.catchup.behind_seconds)+' behind':'caught up';
   $('eta').textContent=s.catchup.eta_seconds?'about '+dur(s.catchup.eta_seconds)+' left':'';}
  const mix=s.mix||{kinds:{},top_collections:[]};
  const kinds=Object.entries(mix.kinds); rows('kinds',kinds,Math.max(0,...kinds.map(k=>k[1])));
  rows('colls',mix.top_collections,mix.top_collections.length?mix.top_collections[0][1]:0);
  prev={s,t:now};
 }catch(e){$('up').textContent='unreachable';$('up').className='v bad';}
}
tick(); history(); setInterval(tick,2000); setInterval(history,5000);
</script></body></html>
"##;
