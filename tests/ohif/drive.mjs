// Drives the OHIF Viewer in Debian's Chromium for tests/test_ohif.py.
//
//   node drive.mjs '<json config>'
//
// config: { viewer, studyUid, marker, chromium, userDataDir, artifacts, timeoutMs, overlay,
//          scroll }
// (marker: text of the study's row, e.g. its Study Description; overlay: the Series Description
// of a DICOM SEG of the study to open over the image, optional; scroll: slices to move
// through the stack before the overlay is measured, optional)
// Opens the study list, waits for the study's row, opens the study in the basic viewer from
// that row, waits until the image viewport's canvas shows pixels, and screenshots both pages
// into `artifacts`. Prints one JSON object on stdout: every request to /dicom-web (method, URL,
// status or failure), the viewport's bounding box in the screenshot, and what went wrong.
import puppeteer from 'puppeteer-core';

const config = JSON.parse(process.argv[2]);
const timeout = config.timeoutMs ?? 120000;
const result = {
  requests: [],
  console: [],
  pageErrors: [],
  studyListed: false,
  viewerUrl: null,
  viewport: null,
  canvas: null,
  overlay: null,
  error: null,
};

const flags = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  `--user-data-dir=${config.userDataDir}`,
  // WebGL without a GPU: SwiftShader (cornerstone3D renders through WebGL).
  '--use-angle=swiftshader',
  '--enable-unsafe-swiftshader',
  '--window-size=1400,900',
];

// Click a button by its text if it is there (banners and the first-visit tour); no error if not.
async function dismiss(page, text) {
  const buttons = await page.$$(`xpath///button[normalize-space(.)="${text}"]`);
  for (const button of buttons) {
    await button.click().catch(() => null);
  }
  return buttons.length;
}

const isDicomweb = (url) => url.includes('/dicom-web/') || url.endsWith('/dicom-web');

async function colourStats(page) {
  // The largest visible canvas: fraction of coloured (not grey) pixels, i.e. an overlay.
  return page.evaluate(() => {
    const canvases = [...document.querySelectorAll('canvas')].filter((c) => {
      const r = c.getBoundingClientRect();
      return r.width > 100 && r.height > 100;
    });
    canvases.sort((a, b) => b.width * b.height - a.width * a.height);
    let best = null;
    for (const canvas of canvases) {
      const ctx = canvas.getContext('2d', { willReadFrequently: true });
      if (!ctx) continue;
      const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
      let coloured = 0;
      let total = 0;
      const colours = {};
      for (let i = 0; i < data.length; i += 16) {
        total += 1;
        const [r, g, b] = [data[i], data[i + 1], data[i + 2]];
        if (Math.max(r, g, b) - Math.min(r, g, b) > 40) {
          coloured += 1;
          const key = `${r >> 5},${g >> 5},${b >> 5}`;
          colours[key] = (colours[key] ?? 0) + 1;
        }
      }
      const top = Object.entries(colours).sort((a, b) => b[1] - a[1]).slice(0, 5);
      if (!best || coloured > best.coloured) best = { coloured, total, top };
    }
    return best;
  });
}

async function canvasStats(page) {
  // The largest visible canvas inside an OHIF viewport: fraction of non-black pixels.
  return page.evaluate(() => {
    const canvases = [...document.querySelectorAll('canvas')].filter((c) => {
      const r = c.getBoundingClientRect();
      return r.width > 100 && r.height > 100;
    });
    canvases.sort((a, b) => b.width * b.height - a.width * a.height);
    const canvas = canvases[0];
    if (!canvas) return null;
    const r = canvas.getBoundingClientRect();
    let lit = 0;
    let total = 0;
    try {
      const ctx = canvas.getContext('2d', { willReadFrequently: true });
      if (!ctx) return { x: r.x, y: r.y, width: r.width, height: r.height, lit: -1, total: 0 };
      const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
      for (let i = 0; i < data.length; i += 16) {
        total += 1;
        if (data[i] + data[i + 1] + data[i + 2] > 90) lit += 1;
      }
    } catch (e) {
      return { x: r.x, y: r.y, width: r.width, height: r.height, lit: -1, total: 0, error: String(e) };
    }
    return { x: r.x, y: r.y, width: r.width, height: r.height, lit, total };
  });
}

let browser;
try {
  browser = await puppeteer.launch({
    executablePath: config.chromium,
    headless: true,
    args: flags,
    defaultViewport: { width: 1400, height: 900 },
    protocolTimeout: timeout,
  });
  const page = await browser.newPage();
  page.setDefaultTimeout(timeout);
  page.on('response', (response) => {
    const request = response.request();
    if (isDicomweb(request.url()) && request.method() !== 'OPTIONS') {
      result.requests.push({ method: request.method(), url: request.url(), status: response.status() });
    }
  });
  page.on('requestfailed', (request) => {
    if (isDicomweb(request.url())) {
      result.requests.push({
        method: request.method(),
        url: request.url(),
        status: null,
        failure: request.failure()?.errorText ?? 'failed',
      });
    }
  });
  page.on('console', (message) => {
    if (['error', 'warn'].includes(message.type())) {
      result.console.push(`${message.type()}: ${message.text()}`.slice(0, 500));
    }
  });
  page.on('pageerror', (error) => result.pageErrors.push(String(error).slice(0, 500)));

  // 1. The study list shows the study.
  await page.goto(`${config.viewer}/`, { waitUntil: 'domcontentloaded' });
  await page.waitForFunction(
    (id) => document.body && document.body.innerText.includes(id),
    { timeout },
    config.marker,
  );
  result.studyListed = true;
  await dismiss(page, 'Confirm and hide'); // the "investigational use only" banner
  await page.waitForNetworkIdle({ idleTime: 750, timeout });
  await page.screenshot({ path: `${config.artifacts}/ohif-study-list.png` });

  // 2. Open the study from its row: expand it, then its "Basic Viewer" mode button.
  const row = await page.waitForSelector(`xpath///*[contains(text(), "${config.marker}")]`);
  await row.click();
  // The row's series and their thumbnails load before we leave the page (leaving aborts them).
  await page.waitForNetworkIdle({ idleTime: 750, timeout });
  const button = await page.waitForSelector(
    'xpath///button[contains(., "Basic Viewer")] | //*[@role="button" and contains(., "Basic Viewer")]',
  );
  await Promise.all([page.waitForNavigation({ waitUntil: 'domcontentloaded' }).catch(() => null), button.click()]);
  result.viewerUrl = page.url();

  // 3. The viewport's canvas shows the image.
  await page.waitForFunction(
    () => {
      const canvases = [...document.querySelectorAll('canvas')].filter((c) => {
        const r = c.getBoundingClientRect();
        return r.width > 100 && r.height > 100;
      });
      return canvases.some((canvas) => {
        const ctx = canvas.getContext('2d', { willReadFrequently: true });
        if (!ctx) return false;
        const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
        let lit = 0;
        for (let i = 0; i < data.length; i += 64) if (data[i] + data[i + 1] + data[i + 2] > 90) lit += 1;
        return lit > data.length / 64 / 50;
      });
    },
    { timeout, polling: 500 },
  );
  await page.waitForNetworkIdle({ idleTime: 1000, timeout }); // the rest of the series loads
  await dismiss(page, 'Skip all'); // the first-visit tour
  await new Promise((r) => setTimeout(r, 500));
  result.canvas = await canvasStats(page);
  const element = await page.$('[data-viewportid], .viewport-wrapper, [data-cy="viewport-pane"]');
  if (element) {
    const box = await element.boundingBox();
    if (box) result.viewport = box;
  }
  await page.screenshot({ path: `${config.artifacts}/ohif-viewer.png` });

  // 4. Optionally, the SEG over the image: open its series from the study panel, accept the
  // viewer's offer to load it, wait for coloured pixels in the viewport.
  if (config.overlay) {
    const thumbnail = await page.waitForSelector(`xpath///*[contains(text(), "${config.overlay}")]`);
    await thumbnail.click({ count: 2 });
    const accept = async () => {
      for (const text of ['Yes', 'Load', 'Confirm']) await dismiss(page, text);
    };
    const deadline = Date.now() + timeout;
    while (Date.now() < deadline) {
      await accept();
      const stats = await colourStats(page);
      result.overlay = stats;
      if (stats && stats.coloured > stats.total / 500) break;
      await new Promise((r) => setTimeout(r, 1000));
    }
    await page.waitForNetworkIdle({ idleTime: 1000, timeout }).catch(() => null);
    // Scroll through the stack to the slice asked for (the viewer opens at one end of it).
    if (config.scroll) {
      const canvas = await colourStats(page);
      const viewport = await page.$('[data-viewportid], .viewport-wrapper, [data-cy="viewport-pane"]');
      const box = viewport ? await viewport.boundingBox() : null;
      if (box) await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
      for (let i = 0; i < Math.abs(config.scroll); i += 1) {
        await page.mouse.wheel({ deltaY: config.scroll > 0 ? 100 : -100 });
        await new Promise((r) => setTimeout(r, 60));
      }
      result.beforeScroll = canvas;
    }
    await page.waitForNetworkIdle({ idleTime: 1000, timeout }).catch(() => null);
    await new Promise((r) => setTimeout(r, 1000));
    result.overlay = await colourStats(page);
    const element = await page.$('[data-viewportid], .viewport-wrapper, [data-cy="viewport-pane"]');
    if (element) {
      const box = await element.boundingBox();
      if (box) result.viewport = box;
    }
    await page.screenshot({ path: `${config.artifacts}/ohif-seg.png` });
  }
} catch (error) {
  result.error = String(error?.stack ?? error).slice(0, 2000);
  try {
    const pages = browser ? await browser.pages() : [];
    if (pages.length) {
      const last = pages[pages.length - 1];
      result.failedAt = last.url();
      result.buttons = await last.evaluate(() =>
        [...document.querySelectorAll('button, [role="button"]')].map((b) => b.innerText.trim()).filter(Boolean).slice(0, 60),
      );
      result.text = (await last.evaluate(() => document.body.innerText)).slice(0, 1500);
      await last.screenshot({ path: `${config.artifacts}/ohif-failure.png` });
    }
  } catch {
    // nothing more to show
  }
} finally {
  if (browser) await browser.close();
}
process.stdout.write(JSON.stringify(result));
