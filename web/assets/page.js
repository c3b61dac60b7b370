// VisitMe's one script (the CSP allows no inline code): times read at a glance
// in the visitor's own language, and panels refreshed in place.
//
// - <time class="ago" datetime="..."> gets "12 sec. ago" as its text and the
//   exact instant, in the visitor's locale, on hover (title).
// - An element with an id and data-refresh-from="<url>" is replaced every few
//   seconds by the element with the same id in a fresh GET of that url; not
//   while the keyboard focus is inside it (a Retry button must not vanish
//   under the user) nor while the tab is hidden.
(() => {
  'use strict';
  const REFRESH_MS = 3000;
  const relative = new Intl.RelativeTimeFormat(undefined, { numeric: 'auto', style: 'short' });
  const exact = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' });
  const UNITS = [['day', 86400], ['hour', 3600], ['minute', 60], ['second', 1]];

  function ago(date) {
    const seconds = (date.getTime() - Date.now()) / 1000;
    for (const [unit, size] of UNITS) {
      if (Math.abs(seconds) >= size || unit === 'second') {
        return relative.format(Math.round(seconds / size), unit);
      }
    }
    return '';
  }

  function renderTimes(root) {
    for (const element of root.querySelectorAll('time.ago[datetime]')) {
      const date = new Date(element.getAttribute('datetime'));
      if (Number.isNaN(date.getTime())) continue;
      element.textContent = ago(date);
      element.title = `${exact.format(date)} (${element.getAttribute('datetime')})`;
    }
  }

  async function refresh(element) {
    if (element.contains(document.activeElement)) return;
    const response = await fetch(element.dataset.refreshFrom, {
      credentials: 'same-origin',
      headers: { Accept: 'text/html' },
    });
    if (!response.ok) return;
    const fresh = new DOMParser()
      .parseFromString(await response.text(), 'text/html')
      .getElementById(element.id);
    if (!fresh || element.contains(document.activeElement)) return;
    renderTimes(fresh);
    element.replaceWith(fresh);
  }

  function tick() {
    renderTimes(document);
    if (document.hidden) return;
    for (const element of document.querySelectorAll('[data-refresh-from][id]')) {
      refresh(element).catch(() => {}); // the next tick tries again
    }
  }

  renderTimes(document);
  setInterval(tick, REFRESH_MS);
})();
