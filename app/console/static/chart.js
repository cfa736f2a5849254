// Line charts and bar histograms drawn as SVG: enough for loss, accuracy and learning-rate curves and
// dataset length histograms, with no charting library to vendor.

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 520;
const HEIGHT = 220;
const PAD = { left: 56, right: 12, top: 12, bottom: 34 };

function node(tag, attrs = {}, text) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) element.setAttribute(name, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

function ticks(low, high, count = 5) {
  if (!(high > low)) return [low];
  const raw = (high - low) / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
  const first = Math.ceil(low / step) * step;
  const values = [];
  for (let v = first; v <= high + step * 1e-9; v += step) values.push(Number(v.toPrecision(12)));
  return values;
}

function label(value) {
  if (value === 0) return "0";
  const size = Math.abs(value);
  if (size >= 1e4 || size < 1e-3) return value.toExponential(1);
  return String(Number(value.toPrecision(3)));
}

function frame(svg, xs, ys, xLabel) {
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const margin = (y1 - y0) * 0.05;
  y0 -= margin; y1 += margin;
  const sx = (x) => PAD.left + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (WIDTH - PAD.left - PAD.right);
  const sy = (y) => HEIGHT - PAD.bottom - ((y - y0) / (y1 - y0)) * (HEIGHT - PAD.top - PAD.bottom);
  const axes = node("g", { class: "axes" });
  for (const y of ticks(y0, y1)) {
    axes.append(node("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: sy(y), y2: sy(y), class: "grid" }));
    axes.append(node("text", { x: PAD.left - 6, y: sy(y) + 4, "text-anchor": "end" }, label(y)));
  }
  for (const x of ticks(x0, x1, 6)) {
    axes.append(node("text", { x: sx(x), y: HEIGHT - PAD.bottom + 16, "text-anchor": "middle" }, label(x)));
  }
  axes.append(node("text", { x: (PAD.left + WIDTH - PAD.right) / 2, y: HEIGHT - 4, "text-anchor": "middle" },
    xLabel));
  svg.append(axes);
  return { sx, sy };
}

// series: [{name, label, color, points: [[x, y], ...]}]. Each series' path carries data-series and
// data-points, so what is drawn can be read back.
export function lineChart(container, { series, xLabel = "step", empty = "No points yet." }) {
  const svg = node("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, class: "chart", role: "img" });
  const drawn = series.filter((s) => s.points.length);
  const xs = drawn.flatMap((s) => s.points.map((p) => p[0]));
  const ys = drawn.flatMap((s) => s.points.map((p) => p[1]));
  if (!xs.length) {
    svg.append(node("text", { x: WIDTH / 2, y: HEIGHT / 2, "text-anchor": "middle", class: "empty" }, empty));
  } else {
    const { sx, sy } = frame(svg, xs, ys, xLabel);
    for (const s of drawn) {
      const d = s.points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
      svg.append(node("path", { d, stroke: s.color, class: "line", "data-series": s.name,
        "data-points": s.points.length }));
      if (s.points.length === 1) {
        const [x, y] = s.points[0];
        svg.append(node("circle", { cx: sx(x), cy: sy(y), r: 3, fill: s.color }));
      }
    }
  }
  const legend = document.createElement("div");
  legend.className = "legend";
  for (const s of series) {
    const item = document.createElement("span");
    item.style.setProperty("--swatch", s.color);
    item.textContent = `${s.label} (${s.points.length})`;
    legend.append(item);
  }
  container.replaceChildren(svg, legend);
}

// bins: {bin_edges: [n+1], counts: [n]}.
export function histogram(container, { bin_edges: edges, counts }, xLabel = "tokens per example") {
  const svg = node("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, class: "chart histogram", role: "img" });
  const { sx, sy } = frame(svg, [edges[0], edges[edges.length - 1]], [0, Math.max(...counts)], xLabel);
  counts.forEach((count, i) => {
    const x = sx(edges[i]);
    const bar = node("rect", { x: x + 1, y: sy(count), width: Math.max(1, sx(edges[i + 1]) - x - 2),
      height: Math.max(0, sy(0) - sy(count)), class: "bar" });
    bar.append(node("title", {}, `${edges[i]}–${edges[i + 1]} tokens: ${count} examples`));
    svg.append(bar);
  });
  container.replaceChildren(svg);
}
