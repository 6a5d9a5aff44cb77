"""The JavaScript the harness runs in OHIF's page: event counters, readiness probes, hiding notifications."""

__all__ = ["INIT_SCRIPT", "PROBE_CORNERSTONE", "PROBE_MICROSCOPY", "TAKE_NOTIFICATIONS"]


# Counts cornerstone's IMAGE_RENDERED per viewport: the event does not bubble,
# but a capturing listener on the document still sees it on its way down.
# OHIF drops some failed promises on the floor; logging them lets a timeout
# say why.
INIT_SCRIPT = """
window.__aigw = { rendered: {} };
document.addEventListener('CORNERSTONE_IMAGE_RENDERED', e => {
  const id = (e.detail && e.detail.viewportId) || 'unknown';
  window.__aigw.rendered[id] = (window.__aigw.rendered[id] || 0) + 1;
}, true);
window.addEventListener('unhandledrejection', e => {
  const r = e.reason;
  console.error('unhandled rejection: ' + ((r && (r.stack || r.message)) || r));
});
"""


# One poll of a cornerstone viewport: which viewport shows the series, whether
# everything it needs has loaded and been drawn, and where the image lies.
PROBE_CORNERSTONE = """
(seriesUid) => { try {
  const s = window.services, cs = window.cornerstone;
  if (!s || !cs || !s.viewportGridService || !s.displaySetService) return { ready: false, why: 'OHIF is booting' };
  const grid = s.viewportGridService.getState();
  if (!grid || !grid.viewports) return { ready: false, why: 'OHIF is booting' };
  const targets = s.displaySetService.getActiveDisplaySets().filter(d => d.SeriesInstanceUID === seriesUid);
  if (!targets.length) return { ready: false, why: 'the series has no display set yet' };
  const uids = targets.map(d => d.displaySetInstanceUID);
  // A SEG (or RTSTRUCT) is drawn once it is a segmentation representation in
  // the viewport of its source; before that (or when loading it failed) it
  // may sit in the viewport as a display set that draws nothing.
  const labels = targets.some(d => d.Modality === 'SEG' || d.Modality === 'RTSTRUCT');
  const segs = id => (s.segmentationService && s.segmentationService.getSegmentationRepresentations)
    ? s.segmentationService.getSegmentationRepresentations(id).map(r => r.segmentationId) : [];
  let vpId = null;
  for (const [id, vp] of grid.viewports) {
    const shown = labels ? segs(id) : (vp.displaySetInstanceUIDs || []);
    if (shown.some(u => uids.includes(u))) { vpId = id; break; }
  }
  if (!vpId) return { ready: false, why: labels ? 'the segmentation is not loaded into a viewport yet'
                                                : 'no viewport shows the series yet' };
  const el = document.querySelector(`[data-viewport-uid="${vpId}"]`);
  // The wrapper also holds the overlays (orientation markers, window/level).
  const pane = el && (el.closest('.viewport-wrapper') || el);
  const canvas = el && el.querySelector('canvas');
  if (!pane || !canvas) return { ready: false, why: `viewport ${vpId} has no canvas yet` };
  const r = pane.getBoundingClientRect();
  const out = { ready: false, viewportId: vpId, pane: [r.left, r.top, r.right, r.bottom] };
  if (pane.querySelector('.loading') || document.querySelector('.infinite-loading-bar'))
    return { ...out, why: 'loading indicator shown' };
  for (const d of targets) {
    if (d.isLoaded === false || d.isLoading) return { ...out, why: `${d.Modality} display set still loading` };
    if ((d.measurements || []).some(m => m.loaded === false)) return { ...out, why: 'SR measurements still loading' };
  }
  const enabled = cs.getEnabledElementByViewportId(vpId);
  const viewport = enabled && enabled.viewport;
  const imageId = viewport && viewport.getCurrentImageId && viewport.getCurrentImageId();
  if (!imageId) return { ...out, why: 'no image in the viewport yet' };
  const actors = viewport.getActors ? viewport.getActors() : [];
  for (const a of (Array.isArray(actors) ? actors : [])) {
    const volume = a.referencedId && cs.cache.getVolume(a.referencedId);
    if (volume && volume.loadStatus && volume.loadStatus.loading && !volume.loadStatus.loaded)
      return { ...out, why: `volume ${a.referencedId} still loading` };
  }
  if (!(window.__aigw && window.__aigw.rendered[vpId])) return { ...out, why: 'cornerstone has not rendered yet' };
  const plane = cs.metaData.get('imagePlaneModule', imageId);
  if (plane && plane.imagePositionPatient && plane.rowCosines && plane.columnCosines && plane.rows) {
    // The image's corners (pixel edges, PS3.3 C.7.6.2.1.1) through the camera.
    const p = plane.imagePositionPatient, rc = plane.rowCosines, cc = plane.columnCosines;
    const dx = plane.columnPixelSpacing || 1, dy = plane.rowPixelSpacing || 1;
    const c = canvas.getBoundingClientRect(), xs = [], ys = [];
    for (const [i, j] of [[-0.5, -0.5], [plane.columns - 0.5, -0.5], [-0.5, plane.rows - 0.5],
                          [plane.columns - 0.5, plane.rows - 0.5]]) {
      const [x, y] = viewport.worldToCanvas([0, 1, 2].map(k => p[k] + i * dx * rc[k] + j * dy * cc[k]));
      xs.push(c.left + x); ys.push(c.top + y);
    }
    out.image = [Math.max(Math.min(...xs), c.left), Math.max(Math.min(...ys), c.top),
                 Math.min(Math.max(...xs), c.right), Math.min(Math.max(...ys), c.bottom)];
  }
  out.ready = true;
  return out;
} catch (e) { return { ready: false, why: `probe: ${e}` }; } }
"""


# The microscopy mode draws with dicom-microscopy-viewer (OpenLayers) into a
# viewport of its own; it is ready when its map is in the page and no tile is
# on its way (the caller counts the requests).
PROBE_MICROSCOPY = """
() => {
  const pane = document.querySelector('[data-viewportid]');
  const map = pane && pane.querySelector('.ol-viewport');
  if (!pane || !map) return { ready: false, why: 'no microscopy viewer yet' };
  if (!Array.from(map.querySelectorAll('canvas')).some(c => c.width > 0))
    return { ready: false, why: 'microscopy viewer has no canvas yet' };
  if (pane.querySelector('.loading') || document.querySelector('.infinite-loading-bar'))
    return { ready: false, why: 'loading indicator shown' };
  const r = pane.getBoundingClientRect();
  return { ready: true, viewportId: pane.dataset.viewportid, pane: [r.left, r.top, r.right, r.bottom] };
}
"""


# Notifications (sonner toasts) float over the viewport: keep their text, hide them.
TAKE_NOTIFICATIONS = """
() => {
  const texts = Array.from(document.querySelectorAll('[data-sonner-toast]')).map(e => e.innerText.trim());
  if (!document.getElementById('aigw-hide-toasts')) {
    const style = document.createElement('style');
    style.id = 'aigw-hide-toasts';
    style.textContent = '[data-sonner-toaster] { display: none !important; }';
    document.head.appendChild(style);
  }
  return texts.filter(t => t);
}
"""
