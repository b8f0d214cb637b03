// Reading Prometheus text (GET /metrics) into the few figures the admin page
// charts, and drawing a small line chart as SVG.

/** Parses the exposition format into `[{name, labels, value}]` (comments skipped). */
export function parse(text) {
  const samples = [];
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    if (m[3]) {
      for (const l of m[3].matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    }
    const value = Number(m[4]);
    if (!Number.isNaN(value)) samples.push({ name: m[1], labels, value });
  }
  return samples;
}

function sum(samples, name, filter = () => true) {
  return samples.filter((s) => s.name === name && filter(s.labels)).reduce((a, s) => a + s.value, 0);
}

/** Cumulative latency histogram of all routes: Map(le → count). */
function buckets(samples) {
  const out = new Map();
  for (const s of samples) {
    if (s.name !== 'http_request_duration_seconds_bucket') continue;
    const le = s.labels.le === '+Inf' ? Infinity : Number(s.labels.le);
    out.set(le, (out.get(le) || 0) + s.value);
  }
  return out;
}

/** The q-quantile of the requests between two histograms (linear within a bucket). */
function quantile(before, after, q) {
  const bounds = [...after.keys()].sort((a, b) => a - b);
  const counts = bounds.map((b) => (after.get(b) || 0) - (before.get(b) || 0));
  const total = counts[counts.length - 1] || 0;
  if (total <= 0) return null;
  const rank = q * total;
  let lowerBound = 0;
  let lowerCount = 0;
  for (let i = 0; i < bounds.length; i += 1) {
    if (counts[i] >= rank) {
      if (bounds[i] === Infinity) return lowerBound;
      const width = counts[i] - lowerCount;
      return width > 0 ? lowerBound + ((bounds[i] - lowerBound) * (rank - lowerCount)) / width : bounds[i];
    }
    lowerBound = bounds[i];
    lowerCount = counts[i];
  }
  return lowerBound;
}

/**
 * From two scrapes `dt` seconds apart: requests/s, p99 latency (ms) and generated
 * tokens/s over that interval.
 */
export function rates(prev, next, dt) {
  const requests = sum(next, 'http_requests_total') - sum(prev, 'http_requests_total');
  const tokens = sum(next, 'generate_tokens_total') - sum(prev, 'generate_tokens_total');
  const p99 = quantile(buckets(prev), buckets(next), 0.99);
  return {
    requestsPerSec: Math.max(0, requests / dt),
    p99Ms: p99 === null ? 0 : p99 * 1000,
    tokensPerSec: Math.max(0, tokens / dt),
  };
}

const SVG = 'http://www.w3.org/2000/svg';

/** A small line chart of `values` (newest last) with its title and the last value. */
export function chart(title, values, unit) {
  const w = 240;
  const hgt = 60;
  const max = Math.max(1e-9, ...values);
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('viewBox', `0 0 ${w} ${hgt}`);
  svg.setAttribute('class', 'chart');
  svg.setAttribute('role', 'img');
  const last = values.length ? values[values.length - 1] : 0;
  const label = `${title}: ${last.toFixed(1)} ${unit}`;
  svg.setAttribute('aria-label', label);
  const step = values.length > 1 ? w / (values.length - 1) : w;
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(hgt - 4 - (v / max) * (hgt - 8)).toFixed(1)}`);
  const line = document.createElementNS(SVG, 'polyline');
  line.setAttribute('points', points.join(' ') || `0,${hgt - 4} ${w},${hgt - 4}`);
  line.setAttribute('fill', 'none');
  line.setAttribute('stroke', 'currentColor');
  line.setAttribute('stroke-width', '2');
  svg.append(line);
  const figure = document.createElement('figure');
  figure.className = 'chart-box';
  const caption = document.createElement('figcaption');
  caption.textContent = label;
  figure.append(caption, svg);
  return figure;
}
