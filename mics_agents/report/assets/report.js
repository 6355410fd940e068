/* mics report: draws the run summary, a virtualised item list and one item's search tree.
 * Every piece of data reaches the DOM through textContent or a text node, never as markup. */
(function () {
  'use strict';

  const SVG_NS = 'http://www.w3.org/2000/svg';
  const STATUS_LABELS = { success: 'success', no_path: 'no path', model_error: 'model error', bad_input: 'bad input', internal_error: 'internal error' };
  const STATUS_HELP = {
    success: 'a mentor step led interns to the answer',
    no_path: 'every candidate scored 0',
    model_error: 'a model call failed for good; retried on the next run',
    bad_input: 'the input line could not be used',
    internal_error: 'a defect of mics-agents (please report it); retried on the next run',
  };
  const TREND_COLORS = { increasing: '#1a7f37', constant: '#0969da', fluctuating: '#bf8700', 'non-increasing': '#cf222e', none: '#8c959f' };
  const PALETTE = ['#0969da', '#d4580b', '#1a7f37', '#8250df', '#bf3989', '#0a7c86', '#9a6700', '#57606a'];
  const ROW_HEIGHT = 58;
  const OVERSCAN = 8;

  let DATA = null;
  let view = [];            // indices of the items that pass the filters, in file order
  let selected = -1;        // index of the item shown in the detail pane
  let haystacks = null;     // lower-cased searchable text per item, built on the first search

  // ---- DOM helpers --------------------------------------------------------------------------------

  function append(node, children) {
    if (children == null) return node;
    if (!Array.isArray(children)) children = [children];
    for (const child of children) {
      if (child == null || child === false) continue;
      if (Array.isArray(child)) append(node, child);
      else node.appendChild(typeof child === 'object' ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function el(tag, props, children) {
    const node = document.createElement(tag);
    for (const key in props || {}) {
      const value = props[key];
      if (value == null || value === false) continue;
      if (key === 'text') node.textContent = String(value);
      else if (key === 'class') node.className = value;
      else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? '' : String(value));
    }
    return append(node, children);
  }

  function svg(tag, attrs, children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const key in attrs || {}) if (attrs[key] != null) node.setAttribute(key, String(attrs[key]));
    return append(node, children);
  }

  const $ = (id) => document.getElementById(id);

  function setChildren(node, children) {
    node.replaceChildren();
    return append(node, children);
  }

  // ---- formatting ----------------------------------------------------------------------------------

  const int = (n) => (n == null ? '–' : Math.round(n).toLocaleString('en-US'));
  const pct = (x, digits) => (x == null ? '–' : (100 * x).toFixed(digits == null ? 1 : digits) + '%');
  const share = (part, whole) => (whole ? part / whole : null);
  function compact(n) {
    if (n >= 1e9) return (n / 1e9).toFixed(2) + 'B';
    if (n >= 1e6) return (n / 1e6).toFixed(2) + 'M';
    if (n >= 1e4) return (n / 1e3).toFixed(1) + 'k';
    return int(n);
  }
  const money = (x) => '$' + (x >= 100 ? x.toFixed(0) : x >= 1 ? x.toFixed(2) : x.toFixed(4));
  const score = (x) => (x == null ? '–' : (Math.round(x * 100) / 100).toString());
  const mentorColor = (index) => PALETTE[index % PALETTE.length];
  const statusLabel = (status) => STATUS_LABELS[status] || status;

  function scoreColor(x) {
    if (x == null) return '#8c959f';
    if (x >= 1) return '#1a7f37';
    if (x <= 0) return '#cf222e';
    return '#bf8700';
  }

  function badge(status) {
    return el('span', { class: 'badge st-' + (STATUS_LABELS[status] ? status : 'other'), text: statusLabel(status) });
  }

  function mentorChip(index) {
    const dot = el('span', { class: 'dot' });
    dot.style.background = mentorColor(index);
    return el('span', { class: 'mentor', title: DATA.mentors[index] }, [dot, DATA.mentors[index]]);
  }

  // ---- loading -------------------------------------------------------------------------------------

  async function loadData() {
    if (typeof DecompressionStream === 'undefined') {
      throw new Error('this browser cannot unpack the report (it lacks DecompressionStream: use a browser from 2023 or later)');
    }
    const encoded = $('mics-data').textContent.replace(/\s+/g, '');
    const binary = atob(encoded);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('gzip'));
    return JSON.parse(await new Response(stream).text());
  }

  // ---- charts --------------------------------------------------------------------------------------

  function card(title, body, extraClass) {
    return el('div', { class: 'card' + (extraClass ? ' ' + extraClass : '') }, [el('h2', { text: title }), body]);
  }

  /* rows: [{label, value, fraction (0..1 of the bar), color, text, sub, title, onclick}] */
  function hbars(rows) {
    const box = el('div', { class: 'hbars' });
    for (const row of rows) {
      const fill = el('div', { class: 'fill' });
      fill.style.width = Math.max(0, Math.min(1, row.fraction || 0)) * 100 + '%';
      fill.style.background = row.color || '#0969da';
      const label = el('div', { class: 'hbar-label', title: row.title || row.label }, row.labelNode || row.label);
      const line = el('div', { class: 'hbar' + (row.onclick ? ' clickable' : ''), onclick: row.onclick }, [
        label, el('div', { class: 'track' }, fill), el('div', { class: 'hbar-value', text: row.text }),
      ]);
      box.appendChild(line);
      if (row.sub) box.appendChild(el('div', { class: 'hbar-sub', text: row.sub }));
    }
    if (!rows.length) box.appendChild(el('p', { class: 'muted', text: 'Nothing to show.' }));
    return box;
  }

  function donut(parts, total) {
    const size = 132, radius = 52, stroke = 20, circumference = 2 * Math.PI * radius;
    const chart = svg('svg', { viewBox: `0 0 ${size} ${size}`, width: size, height: size, class: 'donut', role: 'img' });
    chart.appendChild(svg('circle', { cx: size / 2, cy: size / 2, r: radius, fill: 'none', stroke: '#eaeef2', 'stroke-width': stroke }));
    let offset = 0;
    for (const part of parts) {
      if (!part.value) continue;
      const length = (part.value / total) * circumference;
      chart.appendChild(svg('circle', {
        cx: size / 2, cy: size / 2, r: radius, fill: 'none', stroke: part.color, 'stroke-width': stroke,
        'stroke-dasharray': `${length} ${circumference - length}`, 'stroke-dashoffset': -offset,
        transform: `rotate(-90 ${size / 2} ${size / 2})`,
      }, svg('title', {}, `${part.label}: ${int(part.value)}`)));
      offset += length;
    }
    chart.appendChild(svg('text', { x: size / 2, y: size / 2 - 2, 'text-anchor': 'middle', class: 'donut-number' }, compact(total)));
    chart.appendChild(svg('text', { x: size / 2, y: size / 2 + 16, 'text-anchor': 'middle', class: 'donut-label' }, 'items'));
    return chart;
  }

  function columns(entries, color) {
    const width = 300, height = 150, top = 18, bottom = 24, gap = 14;
    const max = Math.max(1, ...entries.map((e) => e.value));
    const chart = svg('svg', { viewBox: `0 0 ${width} ${height}`, class: 'columns', role: 'img', preserveAspectRatio: 'xMidYMid meet' });
    const slot = (width - gap) / Math.max(1, entries.length);
    chart.appendChild(svg('line', { x1: 0, x2: width, y1: height - bottom + 0.5, y2: height - bottom + 0.5, stroke: '#d0d7de' }));
    entries.forEach((entry, i) => {
      const barHeight = ((height - top - bottom) * entry.value) / max;
      const x = gap + i * slot, barWidth = slot - gap;
      chart.appendChild(svg('rect', {
        x, y: height - bottom - barHeight, width: barWidth, height: Math.max(barHeight, entry.value ? 1 : 0), rx: 3,
        fill: entry.color || color,
      }, svg('title', {}, `${entry.label}: ${int(entry.value)}`)));
      chart.appendChild(svg('text', { x: x + barWidth / 2, y: height - bottom - barHeight - 5, 'text-anchor': 'middle', class: 'col-value' }, int(entry.value)));
      chart.appendChild(svg('text', { x: x + barWidth / 2, y: height - 7, 'text-anchor': 'middle', class: 'col-label' }, entry.label));
    });
    return chart;
  }

  // ---- summary -------------------------------------------------------------------------------------

  function renderSummary() {
    const summary = DATA.summary;
    const total = summary.items;
    const statusParts = Object.keys(summary.status).map((status) => ({
      status, label: statusLabel(status), value: summary.status[status],
      color: getComputedStyle(document.documentElement).getPropertyValue('--st-' + (STATUS_LABELS[status] ? status : 'other')).trim(),
    }));
    const legend = el('div', { class: 'legend' }, statusParts.map((part) => {
      const swatch = el('span', { class: 'swatch' });
      swatch.style.background = part.color;
      return el('button', {
        class: 'legend-row', type: 'button', title: (STATUS_HELP[part.status] || part.status) + ' (click to list them)',
        'data-status': part.status, onclick: () => { setFilter('filter-status', part.status); },
      }, [swatch, el('span', { class: 'legend-label', text: part.label }),
          el('span', { class: 'legend-count', text: int(part.value) }),
          el('span', { class: 'legend-share muted', text: pct(share(part.value, total), 0) })]);
    }));
    const statusBody = el('div', { class: 'status-body' }, [donut(statusParts, total), legend]);
    const statusFoot = summary.unreadable_lines
      ? el('p', { class: 'note warn', text: `${int(summary.unreadable_lines)} unreadable line(s) skipped` }) : null;

    const successes = summary.status.success || 0;
    const depthEntries = Object.keys(summary.depth).map((depth) => ({ label: depth === 'none' ? '–' : 'depth ' + depth, value: summary.depth[depth] }));
    const searchIds = summary.search_id;
    const depthNote = el('p', { class: 'note' }, [
      el('b', { text: int(searchIds['1'] || 0) }), ' stopped at a full score (search_id 1), ',
      el('b', { text: int(searchIds['0'] || 0) }), ' ran out of depth (0)',
    ]);

    const trendRows = Object.keys(summary.trend).map((trend) => ({
      label: trend === 'none' ? 'no trend' : trend, fraction: share(summary.trend[trend], successes), color: TREND_COLORS[trend] || '#8c959f',
      text: `${int(summary.trend[trend])} · ${pct(share(summary.trend[trend], successes), 0)}`,
      onclick: () => setFilter('filter-trend', trend),
    }));

    const mentorRows = DATA.mentors.map((name, index) => {
      const stats = summary.mentors[name];
      return {
        labelNode: mentorChip(index), title: name, fraction: share(stats.wins, successes), color: mentorColor(index),
        text: `${int(stats.wins)} · ${pct(share(stats.wins, successes), 0)}`,
        sub: `${int(stats.candidates)} candidates, mean score ${score(stats.mean_score)}`,
        onclick: () => setFilter('filter-mentor', String(index)),
      };
    });

    const internRows = DATA.interns.map((name) => {
      const stats = summary.interns[name];
      const temperatures = stats.by_temperature.map((row) => `T ${row.temperature == null ? '?' : row.temperature}: ${pct(row.accuracy, 0)}`).join('  ·  ');
      const truncated = stats.truncated || 0;
      const badFormat = stats.samples - stats.format_ok - truncated;
      return {
        label: name, fraction: stats.accuracy, color: '#0a7c86',
        text: `${pct(stats.accuracy)} · ${int(stats.correct)}/${int(stats.samples)}`,
        sub: temperatures + (badFormat > 0 ? `  ·  ${int(badFormat)} without a final-answer line` : '')
          + (truncated ? `  ·  ${int(truncated)} cut off by the token budget (raise MICS_INTERN_MAX_TOKENS)` : ''),
      };
    });
    const judged = summary.judged_by;
    const judgedNote = el('p', { class: 'note', text: 'Verdicts: ' + Object.keys(judged).map((k) => `${k} ${int(judged[k])}`).join(' · ') });

    const usage = summary.usage;
    const sent = usage.calls - usage.cached_calls;
    const cacheFill = el('div', { class: 'fill' });
    cacheFill.style.width = (share(usage.cached_calls, usage.calls) || 0) * 100 + '%';
    const stat = (label, value, title) => el('div', { class: 'stat', title }, [el('div', { class: 'stat-value', text: value }), el('div', { class: 'stat-label', text: label })]);
    const usageBody = el('div', {}, [
      el('div', { class: 'stats' }, [
        stat('model calls', compact(usage.calls), int(usage.calls)),
        stat('cache hits', compact(usage.cached_calls), `${int(usage.cached_calls)} answered from the cache`),
        stat('cost', money(usage.cost_usd), `$${usage.cost_usd}`),
        ...(usage.online_cost_usd > usage.cost_usd + 1e-9
          ? [stat('online equivalent', money(usage.online_cost_usd),
              `the same replies at online prices; provider batch APIs saved ${money(usage.online_cost_usd - usage.cost_usd)}`)]
          : []),
        stat('input tokens', compact(usage.input_tokens), int(usage.input_tokens)),
        stat('output tokens', compact(usage.output_tokens), int(usage.output_tokens)),
        stat('sent', compact(sent), `${int(sent)} calls sent to a provider`),
      ]),
      el('div', { class: 'cachebar', title: `${pct(share(usage.cached_calls, usage.calls))} of calls came from the cache` }, [
        el('div', { class: 'track cache' }, cacheFill),
        el('span', { class: 'muted', text: `${pct(share(usage.cached_calls, usage.calls), 0)} of calls from the cache` }),
      ]),
    ]);

    const steps = summary.steps;
    const stepCard = steps ? card('Step data (scored trees)', [
      columns(Object.keys(steps.gap_histogram).map((gap) => ({ label: 'gap ' + gap, value: steps.gap_histogram[gap] })), '#8250df'),
      el('p', { class: 'note' }, [
        el('b', { text: int(steps.rows) }), ` step rows (${int(steps.labels.true || 0)} above the label threshold ${steps.settings.label_threshold}, `
          + `${int(steps.labels.false || 0)} not) · `,
        el('b', { text: int(steps.pairs) }), ` sibling pairs at least ${steps.settings.pair_margin} apart, by score gap`,
      ]),
    ]) : null;

    const pane = $('summary');
    setChildren(pane, [
      card('Items', [statusBody, statusFoot]),
      card('Final depth (successes)', [columns(depthEntries, '#0969da'), depthNote]),
      card('Path trend (successes)', hbars(trendRows)),
      card('Mentor wins (last step)', hbars(mentorRows)),
      card('Intern accuracy (all samples)', [hbars(internRows), judgedNote]),
      card('Calls, cache and cost', usageBody),
      stepCard,
    ]);
    pane.hidden = false;
  }

  // ---- filters and list ----------------------------------------------------------------------------

  function fillSelect(id, allLabel, options) {
    const select = $(id);
    setChildren(select, [el('option', { value: '', text: allLabel }),
      ...options.map((option) => el('option', { value: option.value, text: option.label }))]);
    select.addEventListener('change', applyFilters);
  }

  function setFilter(id, value) {
    for (const other of ['filter-status', 'filter-depth', 'filter-trend', 'filter-mentor']) $(other).value = '';
    $('search').value = '';
    $(id).value = value;
    applyFilters();
    $('browser').scrollIntoView({ behavior: 'smooth', block: 'start' });
  }

  function setupFilters() {
    const items = DATA.items;
    const counts = (key) => {
      const map = new Map();
      for (const item of items) {
        const value = item[key] == null ? 'none' : String(item[key]);
        map.set(value, (map.get(value) || 0) + 1);
      }
      return map;
    };
    fillSelect('filter-status', `All (${int(items.length)})`,
      Object.keys(DATA.summary.status).map((s) => ({ value: s, label: `${statusLabel(s)} (${int(DATA.summary.status[s])})` })));
    const depths = counts('depth');
    fillSelect('filter-depth', 'Any', [...depths.keys()].sort((a, b) => (a === 'none') - (b === 'none') || a - b)
      .map((d) => ({ value: d, label: `${d === 'none' ? 'none' : d} (${int(depths.get(d))})` })));
    const trends = counts('trend');
    fillSelect('filter-trend', 'Any', [...trends.keys()].sort((a, b) => (a === 'none') - (b === 'none') || a.localeCompare(b))
      .map((t) => ({ value: t, label: `${t} (${int(trends.get(t))})` })));
    const winners = counts('win');
    fillSelect('filter-mentor', 'Any', [
      ...DATA.mentors.map((name, index) => ({ value: String(index), label: `${name} (${int(winners.get(String(index)) || 0)})` })),
      { value: 'none', label: `no winner (${int(winners.get('none') || 0)})` },
    ]);
    let timer = null;
    $('search').addEventListener('input', () => { clearTimeout(timer); timer = setTimeout(applyFilters, 90); });
  }

  function buildHaystacks() {
    haystacks = DATA.items.map((item) => [item.rid, item.q, item.a, item.err || ''].join('\n').toLowerCase());
  }

  function applyFilters() {
    const status = $('filter-status').value, depth = $('filter-depth').value;
    const trend = $('filter-trend').value, mentor = $('filter-mentor').value;
    const words = $('search').value.toLowerCase().split(/\s+/).filter(Boolean);
    if (words.length && !haystacks) buildHaystacks();
    const items = DATA.items;
    view = [];
    for (let i = 0; i < items.length; i++) {
      const item = items[i];
      if (status && item.status !== status) continue;
      if (depth && String(item.depth == null ? 'none' : item.depth) !== depth) continue;
      if (trend && String(item.trend == null ? 'none' : item.trend) !== trend) continue;
      if (mentor && String(item.win == null ? 'none' : item.win) !== mentor) continue;
      if (words.length) {
        const text = haystacks[i];
        if (!words.every((word) => text.includes(word))) continue;
      }
      view.push(i);
    }
    $('count').textContent = view.length === items.length
      ? `${int(items.length)} items` : `${int(view.length)} of ${int(items.length)} items`;
    $('list').scrollTop = 0;
    $('list-spacer').style.height = Math.max(view.length * ROW_HEIGHT, 1) + 'px';
    drawRows();
  }

  function row(index, position) {
    const item = DATA.items[index];
    const meta = [];
    if (item.depth != null) meta.push(el('span', { class: 'chip', text: 'depth ' + item.depth }));
    if (item.trend) meta.push(el('span', { class: 'chip', text: item.trend }));
    if (item.win != null) meta.push(mentorChip(item.win));
    if (item.status !== 'success' && item.err) meta.push(el('span', { class: 'row-err', text: item.err }));
    const firstLine = (item.q || '').split('\n', 1)[0] || (item.status === 'bad_input' ? '(no readable question)' : '');
    const node = el('div', {
      class: 'row' + (index === selected ? ' selected' : ''), role: 'option', 'aria-selected': index === selected ? 'true' : 'false',
      'data-index': index, onclick: () => select(index),
    }, [
      el('div', { class: 'row-top' }, [el('span', { class: 'rid', text: item.rid, title: item.rid }), badge(item.status), ...meta]),
      el('div', { class: 'row-q', text: firstLine, title: firstLine }),
    ]);
    node.style.top = position * ROW_HEIGHT + 'px';
    return node;
  }

  let drawPending = false;
  function drawRows() {
    const list = $('list');
    const first = Math.max(0, Math.floor(list.scrollTop / ROW_HEIGHT) - OVERSCAN);
    const last = Math.min(view.length, Math.ceil((list.scrollTop + list.clientHeight) / ROW_HEIGHT) + OVERSCAN);
    const rows = [];
    for (let position = first; position < last; position++) rows.push(row(view[position], position));
    if (!view.length) rows.push(el('p', { class: 'muted list-empty', text: 'No item matches these filters.' }));
    setChildren($('list-spacer'), rows);
  }

  function scheduleDraw() {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(() => { drawPending = false; drawRows(); });
  }

  function moveSelection(step) {
    if (!view.length) return;
    let position = view.indexOf(selected);
    position = position < 0 ? 0 : Math.max(0, Math.min(view.length - 1, position + step));
    select(view[position]);
    const list = $('list');
    const top = position * ROW_HEIGHT;
    if (top < list.scrollTop) list.scrollTop = top;
    else if (top + ROW_HEIGHT > list.scrollTop + list.clientHeight) list.scrollTop = top + ROW_HEIGHT - list.clientHeight;
  }

  // ---- detail --------------------------------------------------------------------------------------

  function select(index) {
    if (index < 0 || index >= DATA.items.length) return;
    selected = index;
    drawRows();
    renderDetail(DATA.items[index]);
    const hash = '#item=' + encodeURIComponent(DATA.items[index].rid);
    if (location.hash !== hash) {
      try { location.hash = hash; } catch (error) { /* a sandboxed viewer may forbid it: the link is a nicety */ }
    }
  }

  function selectFromHash() {
    const match = /^#item=(.*)$/.exec(location.hash);
    if (!match) return;
    let rid;
    try { rid = decodeURIComponent(match[1]); } catch (error) { return; }
    const index = DATA.items.findIndex((item) => item.rid === rid);
    if (index < 0 || index === selected) return;
    select(index);
    const position = view.indexOf(index);
    if (position >= 0) $('list').scrollTop = Math.max(0, (position - 2) * ROW_HEIGHT);
  }

  function section(title, children, extra) {
    return el('section', { class: 'block' + (extra ? ' ' + extra : '') }, [el('h3', { text: title }), children]);
  }

  function thumbnails(paths) {
    return el('div', { class: 'thumbs' }, paths.map((path) => {
      const url = DATA.images[path];
      let picture;
      if (typeof url === 'string' && url.startsWith('data:image/jpeg;base64,')) {
        picture = el('img', { alt: path, title: path, loading: 'lazy', decoding: 'async' });
        picture.src = url;
      } else {
        const why = DATA.sources.image_dir ? 'not found' : 'not embedded';
        picture = el('div', { class: 'thumb-missing', title: DATA.sources.image_dir ? 'not found under the image folder' : 'run mics report with --image-dir to embed thumbnails', text: why });
      }
      return el('figure', { class: 'thumb' }, [picture, el('figcaption', { text: path, title: path })]);
    }));
  }

  function sampleTable(samples) {
    const body = samples.map(([intern, temperature, sampleIndex, answer, correct, formatOk, judgedBy]) => el('tr', { class: correct ? 'ok' : 'bad' }, [
      el('td', { class: 'intern', text: DATA.interns[intern], title: DATA.interns[intern] }),
      el('td', { class: 'num', text: temperature == null ? '–' : String(temperature) }),
      el('td', { class: 'num', text: sampleIndex == null ? '–' : String(sampleIndex) }),
      el('td', { class: 'answer' }, [answer || el('span', { class: 'muted', text: '(empty)' }),
        formatOk ? null : el('span', { class: 'chip warn', text: 'no final-answer line' })]),
      el('td', { class: 'verdict' }, el('span', { class: correct ? 'yes' : 'no', text: correct ? '✓ correct' : '✗ wrong' })),
      el('td', { class: 'judged', text: judgedBy }),
    ]));
    return el('table', { class: 'samples-table' }, [
      el('thead', {}, el('tr', {}, ['Intern', 'T', '#', 'Answer', 'Verdict', 'Judged by'].map((h) => el('th', { text: h })))),
      el('tbody', {}, body),
    ]);
  }

  function nodeCard(node) {
    const correct = node.x.reduce((sum, sample) => sum + sample[4], 0);
    const bar = el('div', { class: 'scorebar', title: `MICS-Score ${score(node.sc)}` }, el('div', { class: 'fill' }));
    bar.firstChild.style.width = (node.sc == null ? 0 : node.sc * 100) + '%';
    bar.firstChild.style.background = scoreColor(node.sc);
    const samples = el('details', { class: 'samples' }, el('summary', {},
      `${node.x.length} intern sample${node.x.length === 1 ? '' : 's'} · ${correct} correct`));
    samples.addEventListener('toggle', () => {
      if (samples.open && samples.children.length === 1) samples.appendChild(sampleTable(node.x));
    });
    return el('div', { class: 'node' + (node.sel ? ' selected' : ''), 'data-node': node.id }, [
      el('div', { class: 'node-head' }, [
        mentorChip(node.m),
        el('span', { class: 'chip', text: 'iteration ' + (node.d == null ? '?' : node.d) }),
        el('span', { class: 'chip muted', text: '#' + node.id }),
        node.re ? el('span', { class: 'chip', text: 'reused', title: "taken from the mentor's earlier solution, no new call" }) : null,
        node.sel ? el('span', { class: 'chip sel', text: 'selected' }) : null,
        el('span', { class: 'spacer' }),
        node.x.length ? [bar, el('span', { class: 'score', text: score(node.sc) }),
          el('span', { class: 'muted small', text: `${correct}/${node.x.length}` })]
          : el('span', { class: 'muted small', text: 'not scored' }),
      ]),
      el('div', { class: 'step', text: node.s }),
      node.x.length ? samples : null,
    ]);
  }

  function tree(nodes) {
    const byId = new Map(nodes.map((node) => [node.id, node]));
    const children = new Map();
    const roots = [];
    for (const node of nodes) {
      if (node.p == null || !byId.has(node.p) || node.p === node.id) roots.push(node);
      else {
        if (!children.has(node.p)) children.set(node.p, []);
        children.get(node.p).push(node);
      }
    }
    const seen = new Set();
    // Siblings first, then the candidates that grew from each of them: one group per iteration of the
    // search, read from top to bottom.
    function group(list, parent) {
      const fresh = list.filter((node) => !seen.has(node.id));
      fresh.forEach((node) => seen.add(node.id));
      const parts = [];
      if (parent) {
        parts.push(el('div', { class: 'group-label' }, [
          `Iteration ${fresh[0].d == null ? '?' : fresh[0].d}: after #${parent.id} `, mentorChip(parent.m),
        ]));
      }
      parts.push(el('div', { class: 'branch' }, fresh.map(nodeCard)));
      for (const node of fresh) {
        const kids = children.get(node.id);
        if (kids && kids.some((kid) => !seen.has(kid.id))) {
          parts.push(el('div', { class: 'children' + (node.sel ? ' from-selected' : '') }, group(kids, node)));
        }
      }
      return parts;
    }
    return el('div', { class: 'tree' }, group(roots, null));
  }

  function pathStrip(item) {
    const selectedNodes = item.tree.filter((node) => node.sel).sort((a, b) => (a.d || 0) - (b.d || 0));
    if (!selectedNodes.length) return null;
    const parts = [];
    selectedNodes.forEach((node, position) => {
      if (position) parts.push(el('span', { class: 'arrow', text: '→' }));
      parts.push(el('span', { class: 'path-step' }, [mentorChip(node.m), el('span', { class: 'score', text: score(node.sc) })]));
    });
    return el('div', { class: 'path' }, [el('span', { class: 'muted', text: 'Selected path: ' }), ...parts]);
  }

  function renderDetail(item) {
    const pane = $('detail');
    const meta = [];
    if (item.line != null) meta.push(`input line ${item.line}`);
    if (item.depth != null) meta.push(`depth ${item.depth}`);
    if (item.sid != null) meta.push(`search_id ${item.sid}`);
    if (item.score != null) meta.push(`MICS-Score ${score(item.score)}`);
    if (item.trend) meta.push(`trend ${item.trend}`);
    const [calls, cached, inputTokens, outputTokens, cost] = item.usage;
    const treeBlock = item.tree.length ? section('Search tree', [
      pathStrip(item),
      el('div', { class: 'tree-tools' }, [
        el('button', { type: 'button', class: 'link', text: 'expand all samples', onclick: () => toggleSamples(true) }),
        el('button', { type: 'button', class: 'link', text: 'collapse all', onclick: () => toggleSamples(false) }),
      ]),
      tree(item.tree),
    ], 'tree-block') : null;
    setChildren(pane, [
      el('header', { class: 'detail-head' }, [
        el('h2', { class: 'rid', text: item.rid }), badge(item.status),
        el('span', { class: 'muted', text: meta.join(' · ') }),
      ]),
      item.err ? el('div', { class: 'error-box' }, [el('b', { text: statusLabel(item.status) + ': ' }), item.err]) : null,
      section('Question', el('div', { class: 'text question', text: item.q || '(none)' })),
      section('Ground-truth answer', el('div', { class: 'text answer', text: item.a || '(none)' })),
      item.img.length ? section(`Images (${item.img.length})`, thumbnails(item.img)) : null,
      treeBlock,
      item.reasoning ? el('details', { class: 'block fold' }, [el('summary', { text: 'Saved reasoning' }), el('div', { class: 'text', text: item.reasoning })]) : null,
      item.input != null ? el('details', { class: 'block fold', open: item.status === 'bad_input' }, [el('summary', { text: 'Input line' }), el('pre', { class: 'text mono', text: item.input })]) : null,
      calls ? el('p', { class: 'muted usage', text: `${int(calls)} calls (${int(cached)} cached) · ${int(inputTokens)} input + ${int(outputTokens)} output tokens · ${money(cost)}` }) : null,
    ]);
    pane.scrollTop = 0;
  }

  function toggleSamples(open) {
    for (const details of $('detail').querySelectorAll('details.samples')) {
      if (details.open !== open) {
        details.open = open;
        if (open && details.children.length === 1) details.dispatchEvent(new Event('toggle'));
      }
    }
  }

  // ---- start ---------------------------------------------------------------------------------------

  function renderHeader() {
    $('title').textContent = DATA.title;
    const sources = [[DATA.sources.output, DATA.sources.failed].filter(Boolean).join(' + ')];
    sources.push(DATA.sources.image_dir ? 'thumbnails from ' + DATA.sources.image_dir : 'images not embedded (mics report --image-dir DIR embeds thumbnails)');
    sources.push(`${DATA.mentors.length} mentor${DATA.mentors.length === 1 ? '' : 's'}, ${DATA.interns.length} intern${DATA.interns.length === 1 ? '' : 's'}`);
    $('sources').textContent = sources.join(' · ');
    setChildren($('warnings'), DATA.warnings.map((warning) => el('p', { class: 'notice warn', text: warning })));
  }

  async function main() {
    const started = performance.now();
    try {
      DATA = await loadData();
    } catch (error) {
      $('loading').textContent = 'Cannot open the report: ' + error.message;
      $('loading').classList.add('warn');
      return;
    }
    renderHeader();
    renderSummary();
    setupFilters();
    $('browser').hidden = false;
    $('loading').remove();
    const list = $('list');
    list.addEventListener('scroll', scheduleDraw, { passive: true });
    list.addEventListener('keydown', (event) => {
      if (event.key === 'ArrowDown' || event.key === 'j') { moveSelection(1); event.preventDefault(); }
      if (event.key === 'ArrowUp' || event.key === 'k') { moveSelection(-1); event.preventDefault(); }
    });
    window.addEventListener('resize', scheduleDraw);
    window.addEventListener('hashchange', selectFromHash);
    applyFilters();
    selectFromHash();
    document.body.setAttribute('data-ready', '1');
    document.body.setAttribute('data-load-ms', String(Math.round(performance.now() - started)));
  }

  main();
})();
