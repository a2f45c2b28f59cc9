// gsd-wsi cohort report: sort by clicking a column header, filter by text or status card.
"use strict";
(function () {
  const table = document.getElementById("slides");
  if (!table) return;
  const tbody = table.tBodies[0];
  const headers = Array.from(table.tHead.rows[0].cells);
  const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });
  const slideRows = () => Array.from(tbody.querySelectorAll("tr.slide"));

  function key(row, index, type) {
    const cell = row.cells[index];
    const raw = cell.dataset.sort !== undefined ? cell.dataset.sort : cell.textContent.trim();
    if (raw === "") return null; // empty cells sort last either way
    if (type === "num") {
      const value = parseFloat(raw);
      return Number.isNaN(value) ? null : value;
    }
    return raw;
  }

  function sortBy(th) {
    const index = headers.indexOf(th);
    const type = th.dataset.sortType;
    const ascending = th.getAttribute("aria-sort") !== "ascending";
    const keyed = slideRows().map((row) => [key(row, index, type), row]);
    keyed.sort((a, b) => {
      if (a[0] === null || b[0] === null) return (a[0] === null) - (b[0] === null);
      const order = type === "num" ? a[0] - b[0] : collator.compare(a[0], b[0]);
      return ascending ? order : -order;
    });
    headers.forEach((h) => { if (h.dataset.sortType) h.setAttribute("aria-sort", "none"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    const fragment = document.createDocumentFragment();
    keyed.forEach((pair) => fragment.appendChild(pair[1]));
    tbody.appendChild(fragment);
  }

  headers.forEach((th) => {
    if (!th.dataset.sortType) return;
    th.addEventListener("click", () => sortBy(th));
    th.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") { event.preventDefault(); sortBy(th); }
    });
  });

  const input = document.getElementById("filter");
  const shown = document.getElementById("shown");
  const cards = Array.from(document.querySelectorAll("[data-filter-status]"));
  let status = "";

  function applyFilter() {
    const needle = input ? input.value.trim().toLowerCase() : "";
    const rows = slideRows();
    let visible = 0;
    rows.forEach((row) => {
      const ok = (!status || row.dataset.status === status) &&
                 (!needle || row.textContent.toLowerCase().includes(needle));
      row.hidden = !ok;
      if (ok) visible += 1;
    });
    if (shown) shown.textContent = visible === rows.length ? `${rows.length} slides` : `${visible} of ${rows.length} slides`;
    cards.forEach((card) => card.classList.toggle("active", status !== "" && card.dataset.filterStatus === status));
  }

  cards.forEach((card) => card.addEventListener("click", () => {
    const wanted = card.dataset.filterStatus;
    status = status === wanted ? "" : wanted;
    applyFilter();
  }));
  if (input) input.addEventListener("input", applyFilter);
  applyFilter();
})();
