// The dashboard in real headless Chromium (Debian's /usr/bin/chromium), as an admin uses it:
// first-run setup, create a key, copy its secret, call the API with it, watch the usage bar
// move, revoke it (the next call is 401), add and disable a user, see the models, sign out. Screenshots go to OUTDIR.
//
// Usage: node dashboard.mjs BASE_URL SETUP_TOKEN OUTDIR
import { chromium } from "playwright-core";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";

const [base, token, outdir] = process.argv.slice(2);
mkdirSync(outdir, { recursive: true });

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const context = await browser.newContext({ viewport: { width: 1200, height: 800 } });
  await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: base });
  const page = await context.newPage();

  // First run: the setup link creates the first admin and signs in.
  await page.goto(`${base}/admin/setup?token=${token}`);
  await page.getByLabel("Email").fill("root@example.com");
  await page.getByLabel("Password", { exact: false }).first().fill("long-enough-pw");
  await page.getByLabel("Password again").fill("long-enough-pw");
  await page.getByRole("button", { name: "Create admin and sign in" }).click();
  await page.waitForURL(`${base}/admin/keys`);
  assert.match(await page.content(), /No keys/);

  // Create a key; the secret is shown once, and the Copy button puts it on the clipboard.
  await page.getByRole("link", { name: "New key" }).click();
  await page.getByLabel("Label").fill("Browser demo");
  await page.getByLabel("Email").fill("client@example.com");
  await page.getByLabel("Call quota").fill("3");
  await page.getByRole("button", { name: "Create key" }).click();
  const secret = await page.locator("#secret").inputValue();
  assert.match(secret, /^tg_[0-9a-f]{8}_[0-9a-f]{64}$/);
  await page.getByRole("button", { name: "Copy" }).click();
  await page.getByRole("button", { name: "Copied" }).waitFor();
  assert.equal(await page.evaluate(() => navigator.clipboard.readText()), secret);
  await page.screenshot({ path: `${outdir}/key-created.png`, fullPage: true });

  const call = () => fetch(`${base}/api/`, {
    method: "POST",
    headers: { Authorization: `Bearer ${secret}`, "Content-Type": "application/json" },
    body: JSON.stringify({ text: "What is the capital of France?", max_tokens: 8 }),
  });
  const first = await call();
  assert.equal(first.status, 200, await first.text());

  // The usage bar moved: 1 of 3 calls.
  await page.goto(`${base}/admin/keys`);
  const prefix = secret.slice(3, 11);
  const row = page.locator(`#key-${prefix}`);
  assert.match(await row.innerText(), /1 \/ 3/);
  assert.equal(await row.getByRole("meter").getAttribute("aria-valuenow"), "33");
  await page.screenshot({ path: `${outdir}/keys.png`, fullPage: true });

  // The key's page: today's bar in the requests chart shows the call.
  await row.getByRole("link", { name: "Browser demo" }).click();
  const today = new Date().toISOString().slice(0, 10);
  assert.equal(await page.locator(`svg[aria-label="Requests per day"] rect title`).filter({ hasText: `${today}: 1` }).count(), 1);
  await page.screenshot({ path: `${outdir}/key-detail.png`, fullPage: true });
  await page.goto(`${base}/admin/keys`);

  // Revoke: the next call is refused.
  await row.getByRole("button", { name: "Revoke" }).click();
  await page.waitForURL(`${base}/admin/keys`);
  assert.match(await page.locator(`#key-${prefix}`).innerText(), /revoked/);
  const refused = await call();
  assert.equal(refused.status, 401);

  // The overview shows the finished job and the worker.
  await page.getByRole("link", { name: "Overview" }).click();
  assert.match(await page.content(), /Jobs finished/);
  await page.screenshot({ path: `${outdir}/overview.png`, fullPage: true });
  await page.goto(`${base}/admin/keys`);

  // Users: add one; its login works; disabled, the login is refused; then deleted.
  await page.getByRole("link", { name: "Users" }).click();
  await page.getByLabel("Username").fill("dora");
  await page.getByLabel("Password", { exact: true }).fill("long-enough-pw");
  await page.getByLabel("Prompt token limit", { exact: false }).fill("1000");
  await page.getByRole("button", { name: "Add user" }).click();
  await page.waitForURL(`${base}/admin/users`);
  const login = () => fetch(`${base}/token`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ username: "dora", password: "long-enough-pw" }),
  });
  assert.equal((await login()).status, 200);
  assert.match(await page.locator("#user-dora").innerText(), /enabled/);
  await page.locator("#user-dora").getByRole("button", { name: "Disable" }).click();
  await page.waitForURL(`${base}/admin/users`);
  assert.match(await page.locator("#user-dora").innerText(), /disabled/);
  assert.equal((await login()).status, 403);
  await page.screenshot({ path: `${outdir}/users.png`, fullPage: true });
  await page.locator("#user-dora").getByRole("button", { name: "Delete" }).click();
  await page.waitForURL(`${base}/admin/users`);
  assert.equal(await page.locator("#user-dora").count(), 0);

  // Models: the default model is served and ready.
  await page.getByRole("link", { name: "Models" }).click();
  const modelRow = await page.locator("#model-smollm2").innerText();
  assert.match(modelRow, /\bready\b/);
  assert.doesNotMatch(modelRow, /not ready/);
  await page.screenshot({ path: `${outdir}/models.png`, fullPage: true });
  await page.goto(`${base}/admin/keys`);

  // A narrow screen still shows every key's data.
  await page.setViewportSize({ width: 380, height: 800 });
  await page.screenshot({ path: `${outdir}/keys-narrow.png`, fullPage: true });

  await page.getByRole("button", { name: "Sign out" }).click();
  await page.waitForURL(`${base}/admin/login`);
  await page.goto(`${base}/admin/keys`);
  assert.equal(new URL(page.url()).pathname, "/admin/login");
  console.log("browser checks passed");
} catch (e) {
  for (const p of browser.contexts().flatMap((c) => c.pages())) {
    console.error(`--- page ${p.url()} ---\n${(await p.content()).slice(0, 3000)}`);
    await p.screenshot({ path: `${outdir}/failure.png`, fullPage: true }).catch(() => {});
  }
  throw e;
} finally {
  await browser.close();
}
