// Comparison of two jobs on one artifact (honest vs claimed): the table from GET /comparisons and the picture the
// service renders with matplotlib (GET /comparisons/plot.svg). Selected from the two lists, or with ?compare=A,B.
"use strict";

window.pgolfCompare = (() => {
  const $ = (id) => document.getElementById(id);

  function cell(tag, text, className) {
    const node = document.createElement(tag);
    node.textContent = text;
    if (className) node.className = className;
    return node;
  }

  async function fillJobChoices(selected) {
    let jobs = [];
    try {
      const response = await api("/evaluations?limit=100&status=completed");
      if (!response.ok) return; // e.g. private reads without a token: nothing to choose from
      jobs = await response.json();
    } catch (error) {
      return;
    }
    for (const [index, id] of [[0, "compare-a"], [1, "compare-b"]]) {
      const choice = $(id);
      const options = jobs.map((job) => {
        const option = document.createElement("option");
        option.value = job.id;
        option.textContent = `${job.id.slice(0, 8)} · ttt=${job.options.ttt} ngram=${job.options.ngram} · ` +
          `artifact ${job.artifact_sha256.slice(0, 8)}`;
        return option;
      });
      choice.replaceChildren(...options);
      if (selected[index]) choice.value = selected[index];
      else if (jobs.length > index) choice.value = jobs[index].id;
    }
  }

  async function show(a, b) {
    const message = $("compare-message");
    const query = `a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}`;
    const response = await api(`/comparisons?${query}`);
    const body = await response.json();
    if (!response.ok) {
      message.textContent = `${response.status} ${body.code || ""}: ${body.message || ""}`;
      message.className = "error";
      $("compare-result").hidden = true;
      return;
    }
    const [first, second] = body.sides;
    const head = document.createElement("tr");
    head.append(cell("th", `artifact ${String(body.artifact_sha256).slice(0, 12)}…`), cell("th", first.label),
      cell("th", second.label));
    $("compare-table").tHead.replaceChildren(head);
    const rows = body.rows.map(([what, left, right]) => {
      const row = document.createElement("tr");
      row.dataset.row = what;
      const bad = (value) => (value === "FAIL" || value === "**no**" ? "bad" : "");
      row.append(cell("th", what), cell("td", left.replaceAll("**", ""), bad(left)),
        cell("td", right.replaceAll("**", ""), bad(right)));
      return row;
    });
    $("compare-table").tBodies[0].replaceChildren(...rows);
    const gap = body.claimed_minus_honest_bpb;
    message.textContent = gap === null ? "" : `${second.label} minus ${first.label}: ${gap >= 0 ? "+" : ""}` +
      `${gap.toFixed(6)} bpb`;
    message.className = "";
    $("compare-result").hidden = false;
    // Fetched with the page's token (private reads need it; an <img src> could not send it), shown as a blob.
    const plot = $("compare-plot");
    plot.dataset.loaded = "false";
    plot.dataset.source = `/comparisons/plot.svg?${query}`;
    plot.onload = () => { plot.dataset.loaded = "true"; };  // the picture arrived and decoded
    plot.onerror = () => { plot.dataset.loaded = "error"; };
    for (const [kind, link] of [["svg", $("compare-svg")], ["png", $("compare-png")]]) {
      const picture = await api(`/comparisons/plot.${kind}?${query}`);
      if (!picture.ok) {
        plot.dataset.loaded = "error";
        return;
      }
      const url = URL.createObjectURL(await picture.blob());
      link.href = url;
      link.download = `comparison.${kind}`;
      if (kind === "svg") plot.src = url;
    }
  }

  async function init() {
    const requested = (new URLSearchParams(location.search).get("compare") || "").split(",").filter(Boolean);
    await fillJobChoices(requested);
    $("compare-form").addEventListener("submit", (event) => {
      event.preventDefault();
      show($("compare-a").value, $("compare-b").value);
    });
    if (requested.length === 2) await show(requested[0], requested[1]);
  }

  return { init, show };
})();
