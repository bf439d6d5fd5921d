// SPDX-License-Identifier: GPL-2.0-only
/*
 * snd-xen-vsnd: the channels to the backend. Per stream a request ring with
 * its event channel, an event page with its own, and the buffer shared with
 * the backend (granted page by page, described by a page directory).
 *
 * Requests that must be answered before going on (OPEN, CLOSE, queries) are
 * synchronous and sleep. The ones issued from ALSA's atomic callbacks
 * (TRIGGER, and WRITE/READ that tell the backend how far the application
 * has got) are only queued: their answers are checked when they come.
 */
#include <linux/interrupt.h>
#include <linux/slab.h>
#include <xen/events.h>
#include <xen/page.h>
#include "vsnd.h"

/* Requests the announcements may have outstanding; the rest of the ring is
 * kept for TRIGGER and the synchronous requests.
 */
#define VSND_ANNOUNCE_SLOTS	16

static unsigned int vsnd_ring_free(struct vsnd_stream *s)
{
	return RING_SIZE(&s->ring) - (s->ring.req_prod_pvt - s->ring.rsp_cons);
}

/* Puts one request on the ring and notifies; ring_lock held. */
static void vsnd_push(struct vsnd_stream *s, const struct xensnd_req *req)
{
	struct xensnd_req *slot = RING_GET_REQUEST(&s->ring, s->ring.req_prod_pvt);
	int notify;

	*slot = *req;
	s->ring.req_prod_pvt++;
	RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&s->ring, notify);
	if (notify)
		notify_remote_via_irq(s->req_irq);
}

bool vsnd_request_async(struct vsnd_stream *s, const struct xensnd_req *req)
{
	struct xensnd_req r = *req;
	unsigned long flags;
	bool queued = false;

	spin_lock_irqsave(&s->ring_lock, flags);
	if (!s->dead && vsnd_ring_free(s) > 1) {
		r.id = s->next_req_id++;
		vsnd_push(s, &r);
		queued = true;
	}
	spin_unlock_irqrestore(&s->ring_lock, flags);
	return queued;
}

/* One synchronous request; sync_lock held. A HW_PARAM_QUERY's answer goes
 * to hw_out.
 */
static int vsnd_request_locked(struct vsnd_stream *s, struct xensnd_req *req,
			       struct xensnd_query_hw_param *hw_out)
{
	unsigned long flags;
	int ret;

	lockdep_assert_held(&s->sync_lock);
	reinit_completion(&s->sync_done);
	spin_lock_irqsave(&s->ring_lock, flags);
	if (s->dead || !vsnd_ring_free(s)) {
		ret = s->dead ? -ENODEV : -EBUSY;
		spin_unlock_irqrestore(&s->ring_lock, flags);
		return ret;
	}
	req->id = s->next_req_id++;
	s->sync_id = req->id;
	s->sync_pending = true;
	vsnd_push(s, req);
	spin_unlock_irqrestore(&s->ring_lock, flags);

	if (!wait_for_completion_timeout(&s->sync_done, msecs_to_jiffies(VSND_REQ_TIMEOUT_MS))) {
		spin_lock_irqsave(&s->ring_lock, flags);
		s->sync_pending = false;
		spin_unlock_irqrestore(&s->ring_lock, flags);
		return -ETIMEDOUT;
	}
	spin_lock_irqsave(&s->ring_lock, flags);
	ret = s->sync_status;
	if (!ret && hw_out)
		*hw_out = s->sync_hw;
	spin_unlock_irqrestore(&s->ring_lock, flags);
	return ret;
}

int vsnd_request(struct vsnd_stream *s, struct xensnd_req *req)
{
	int ret;

	mutex_lock(&s->sync_lock);
	ret = vsnd_request_locked(s, req, NULL);
	mutex_unlock(&s->sync_lock);
	return ret;
}

/*
 * HW_PARAM_QUERY: what the backend can do within the ranges in ask. The
 * last question is remembered with its answer, as the hardware rules ask
 * the same one over and over while ALSA refines a configuration.
 */
int vsnd_query(struct vsnd_stream *s, const struct xensnd_query_hw_param *ask,
	       struct xensnd_query_hw_param *got)
{
	struct xensnd_req req = { .operation = XENSND_OP_HW_PARAM_QUERY };
	int ret;

	mutex_lock(&s->sync_lock);
	if (s->query_valid && !memcmp(&s->query_req, ask, sizeof(*ask))) {
		ret = s->query_status;
	} else {
		req.op.hw_param = *ask;
		ret = vsnd_request_locked(s, &req, &s->query_resp);
		/* Only answers are remembered, not a timeout or a dead ring. */
		s->query_valid = ret == 0 || ret == -EINVAL;
		s->query_req = *ask;
		s->query_status = ret;
	}
	if (!ret)
		*got = s->query_resp;
	mutex_unlock(&s->sync_lock);
	return ret;
}

bool vsnd_stream_dead(struct vsnd_stream *s)
{
	unsigned long flags;
	bool dead;

	spin_lock_irqsave(&s->ring_lock, flags);
	dead = s->dead;
	spin_unlock_irqrestore(&s->ring_lock, flags);
	return dead;
}

/*
 * Tells the backend how far the application has got: WRITE (playback) or
 * READ (capture) for each region between what was told and what the
 * application has done, split where the buffer wraps. ring_lock held.
 */
static void vsnd_announce_locked(struct vsnd_stream *s)
{
	u32 size = s->ring_bytes;
	struct xensnd_req req = {
		.operation = s->capture ? XENSND_OP_READ : XENSND_OP_WRITE,
	};

	if (!size)
		return;
	while (s->told_bytes < s->appl_bytes && !s->dead &&
	       RING_SIZE(&s->ring) - vsnd_ring_free(s) < VSND_ANNOUNCE_SLOTS) {
		u32 off = s->told_bytes % size;
		u32 len = min_t(u64, s->appl_bytes - s->told_bytes, size - off);

		req.id = s->next_req_id++;
		req.op.rw.offset = off;
		req.op.rw.length = len;
		vsnd_push(s, &req);
		s->told_bytes += len;
	}
}

void vsnd_announce(struct vsnd_stream *s)
{
	unsigned long flags;

	spin_lock_irqsave(&s->ring_lock, flags);
	vsnd_announce_locked(s);
	spin_unlock_irqrestore(&s->ring_lock, flags);
}

static irqreturn_t vsnd_req_irq(int irq, void *dev_id)
{
	struct vsnd_stream *s = dev_id;
	struct xensnd_resp resp;
	unsigned long flags;
	RING_IDX i, rp;
	int more;

	spin_lock_irqsave(&s->ring_lock, flags);
	do {
		rp = READ_ONCE(s->ring.sring->rsp_prod);
		virt_rmb(); /* the responses up to rp are visible */
		if (rp - s->ring.rsp_cons > RING_SIZE(&s->ring)) {
			/* A producer index no ring can have: stop listening. */
			dev_err_ratelimited(&s->card->xb->dev, "%s: bad response index\n",
					    s->xs_path);
			s->dead = true;
			break;
		}
		for (i = s->ring.rsp_cons; i != rp; i++) {
			memcpy(&resp, RING_GET_RESPONSE(&s->ring, i), sizeof(resp));
			if (s->sync_pending && resp.id == s->sync_id) {
				s->sync_status = resp.status;
				s->sync_hw = resp.resp.hw_param;
				s->sync_pending = false;
				complete(&s->sync_done);
			} else if (resp.status < 0) {
				dev_warn_ratelimited(&s->card->xb->dev,
						     "%s: operation %u failed: %d\n",
						     s->xs_path, resp.operation, resp.status);
			}
		}
		s->ring.rsp_cons = i;
		RING_FINAL_CHECK_FOR_RESPONSES(&s->ring, more);
	} while (more);
	/* Room again: announce what waited for it. */
	vsnd_announce_locked(s);
	spin_unlock_irqrestore(&s->ring_lock, flags);
	return IRQ_HANDLED;
}

static irqreturn_t vsnd_evt_irq(int irq, void *dev_id)
{
	struct vsnd_stream *s = dev_id;
	struct xensnd_event_page *page = s->evt_page;
	struct snd_pcm_substream *substream;
	bool stamp = false, elapsed = false, delay_changed = false;
	unsigned long flags;
	u32 prod;

	spin_lock_irqsave(&s->lock, flags);
	prod = READ_ONCE(page->in_prod);
	virt_rmb(); /* the events up to prod are visible */
	if (prod - s->evt_cons > XENSND_IN_RING_LEN) {
		/* More than the page holds: a confused backend; skip them. */
		s->evt_cons = prod;
	}
	for (; s->evt_cons != prod; s->evt_cons++) {
		struct xensnd_evt evt;
		u32 delay;

		memcpy(&evt, &XENSND_IN_RING_REF(page, s->evt_cons), sizeof(evt));
		/*
		 * The id is not checked: positions are absolute, so a lost
		 * event costs nothing but its timing. A backend that serves
		 * every generation of the upstream frontend (xen-vsnd's twin
		 * events, docs/protocol.md) sends some positions twice, with
		 * different ids; the second moves nothing (vsnd_handle_cur_pos
		 * takes a zero delta as a no-op).
		 */
		if (evt.type != XENSND_EVT_CUR_POS)
			continue;
		memcpy(&delay, (u8 *)&evt + VSND_EVT_DELAY_OFFSET, sizeof(delay));
		vsnd_handle_cur_pos(s, evt.op.cur_pos.position, le32_to_cpu((__force __le32)delay),
				    &stamp, &elapsed, &delay_changed);
	}
	virt_mb(); /* done reading the slots before handing them back */
	WRITE_ONCE(page->in_cons, s->evt_cons);
	/*
	 * ALSA is told of every move, not only of whole periods: it stamps a
	 * stream's status with the time an update first sees the pointer
	 * move, and a reader that corrects for the pointer's age by that
	 * stamp (PipeWire's api.alsa.htimestamp, snd_pcm_status() users)
	 * must get the event's time, not that of the first read after it,
	 * which can come a whole backend cycle later. Sleepers still wake by
	 * avail_min alone.
	 */
	substream = elapsed || stamp ? s->substream : NULL;
	spin_unlock_irqrestore(&s->lock, flags);
	if (substream)
		snd_pcm_period_elapsed(substream);
	if (delay_changed && s->delay_ctl)
		snd_ctl_notify(s->card->card, SNDRV_CTL_EVENT_MASK_VALUE, &s->delay_ctl->id);
	return IRQ_HANDLED;
}

void vsnd_stream_kill(struct vsnd_stream *s, int status)
{
	unsigned long flags;

	spin_lock_irqsave(&s->ring_lock, flags);
	s->dead = true;
	if (s->sync_pending) {
		s->sync_status = status;
		s->sync_pending = false;
		complete(&s->sync_done);
	}
	spin_unlock_irqrestore(&s->ring_lock, flags);
}

/* Unbinds (which also closes) an event channel, or frees one never bound. */
static void vsnd_evtchn_release(struct vsnd_stream *s, int *irq, evtchn_port_t *port)
{
	if (*irq > 0)
		unbind_from_irqhandler(*irq, s);
	else if (*port)
		xenbus_free_evtchn(s->card->xb, *port);
	*irq = 0;
	*port = 0;
}

/* Allocates an event channel for the backend and binds it to `handler`;
 * undone by vsnd_evtchn_release().
 */
static int vsnd_evtchn_bind(struct vsnd_stream *s, irq_handler_t handler, const char *name,
			    evtchn_port_t *port, int *irq)
{
	int ret = xenbus_alloc_evtchn(s->card->xb, port);

	if (ret)
		return ret;
	ret = bind_evtchn_to_irqhandler(*port, handler, 0, name, s);
	if (ret < 0)
		return ret;
	*irq = ret;
	return 0;
}

static void vsnd_stream_free(struct vsnd_stream *s)
{
	vsnd_stream_kill(s, -EIO);
	vsnd_evtchn_release(s, &s->req_irq, &s->req_port);
	vsnd_evtchn_release(s, &s->evt_irq, &s->evt_port);
	if (s->ring_page)
		xenbus_teardown_ring(&s->ring_page, 1, &s->ring_gref);
	if (s->evt_page) {
		void *p = s->evt_page;

		xenbus_teardown_ring(&p, 1, &s->evt_gref);
		s->evt_page = NULL;
	}
	vsnd_buffer_free(s);
}

static void vsnd_stream_init(struct vsnd_stream *s)
{
	spin_lock_init(&s->ring_lock);
	spin_lock_init(&s->lock);
	mutex_init(&s->sync_lock);
	init_completion(&s->sync_done);
}

static int vsnd_stream_alloc(struct vsnd_stream *s)
{
	struct xenbus_device *xb = s->card->xb;
	void *evt;
	int ret;

	/* No interrupt is bound yet: nothing else touches the stream. */
	s->dead = false;
	s->next_req_id = 0;
	s->query_valid = false;
	s->evt_cons = 0;

	ret = xenbus_setup_ring(xb, GFP_KERNEL, &s->ring_page, 1, &s->ring_gref);
	if (ret)
		return ret;
	XEN_FRONT_RING_INIT(&s->ring, (struct xen_sndif_sring *)s->ring_page, XEN_PAGE_SIZE);
	ret = xenbus_setup_ring(xb, GFP_KERNEL, &evt, 1, &s->evt_gref);
	if (ret)
		return ret;
	s->evt_page = evt;

	ret = vsnd_evtchn_bind(s, vsnd_req_irq, "vsnd-req", &s->req_port, &s->req_irq);
	if (ret)
		return ret;
	return vsnd_evtchn_bind(s, vsnd_evt_irq, "vsnd-evt", &s->evt_port, &s->evt_irq);
}

int vsnd_channels_create(struct vsnd_card *vc)
{
	unsigned int i;
	int ret;

	/* Every stream's locks first: a failure frees all of them. */
	for (i = 0; i < vc->nstreams; i++) {
		vc->streams[i].card = vc;
		vsnd_stream_init(&vc->streams[i]);
	}
	for (i = 0; i < vc->nstreams; i++) {
		ret = vsnd_stream_alloc(&vc->streams[i]);
		if (ret) {
			vsnd_channels_free(vc);
			return ret;
		}
	}
	vc->channels_ready = true;
	return 0;
}

void vsnd_channels_free(struct vsnd_card *vc)
{
	unsigned int i;

	for (i = 0; i < vc->nstreams; i++)
		vsnd_stream_free(&vc->streams[i]);
	vc->channels_ready = false;
}

int vsnd_channels_publish(struct vsnd_card *vc)
{
	struct xenbus_transaction xbt;
	unsigned int i;
	int ret;

again:
	ret = xenbus_transaction_start(&xbt);
	if (ret)
		return ret;
	for (i = 0; i < vc->nstreams && !ret; i++) {
		struct vsnd_stream *s = &vc->streams[i];

		const char *dir = s->xs_path;

		ret = xenbus_printf(xbt, dir, XENSND_FIELD_RING_REF, "%u", s->ring_gref) ?:
		      xenbus_printf(xbt, dir, XENSND_FIELD_EVT_CHNL, "%u", s->req_port) ?:
		      xenbus_printf(xbt, dir, XENSND_FIELD_EVT_RING_REF, "%u", s->evt_gref) ?:
		      xenbus_printf(xbt, dir, XENSND_FIELD_EVT_EVT_CHNL, "%u", s->evt_port);
	}
	if (!ret)
		ret = xenbus_printf(xbt, vc->xb->nodename, VSND_FEATURE_DELAY, "1");
	if (ret) {
		xenbus_transaction_end(xbt, 1);
		return ret;
	}
	ret = xenbus_transaction_end(xbt, 0);
	if (ret == -EAGAIN)
		goto again;
	return ret;
}

/*
 * The shared buffer: whole pages from one allocation, so that ALSA can use
 * it as the DMA area and applications can mmap it; each page granted to the
 * backend and listed in a chain of directory pages.
 */
int vsnd_buffer_alloc(struct vsnd_stream *s, size_t bytes)
{
	domid_t be = s->card->xb->otherend_id;
	unsigned int per_dir = (XEN_PAGE_SIZE - sizeof(grant_ref_t)) / sizeof(grant_ref_t);
	unsigned int i, d;
	int ret;

	s->buf_alloc = PAGE_ALIGN(bytes);
	s->buf_npages = s->buf_alloc >> PAGE_SHIFT;
	s->dir_npages = DIV_ROUND_UP(s->buf_npages, per_dir);
	s->buf = alloc_pages_exact(s->buf_alloc, GFP_KERNEL | __GFP_ZERO);
	s->buf_grefs = kcalloc(s->buf_npages, sizeof(grant_ref_t), GFP_KERNEL);
	s->dir_grefs = kcalloc(s->dir_npages, sizeof(grant_ref_t), GFP_KERNEL);
	s->dir_pages = kcalloc(s->dir_npages, sizeof(void *), GFP_KERNEL);
	if (!s->buf || !s->buf_grefs || !s->dir_grefs || !s->dir_pages) {
		ret = -ENOMEM;
		goto fail;
	}
	for (i = 0; i < s->buf_npages; i++)
		s->buf_grefs[i] = INVALID_GRANT_REF;
	for (d = 0; d < s->dir_npages; d++)
		s->dir_grefs[d] = INVALID_GRANT_REF;

	for (i = 0; i < s->buf_npages; i++) {
		ret = gnttab_grant_foreign_access(be, virt_to_gfn(s->buf + i * PAGE_SIZE), 0);
		if (ret < 0)
			goto fail;
		s->buf_grefs[i] = ret;
	}
	/* Fill the directory from its end, so each page knows the next one. */
	for (d = s->dir_npages; d-- > 0;) {
		struct xensnd_page_directory *dir;
		unsigned int first = d * per_dir;
		unsigned int n = min(per_dir, s->buf_npages - first);

		s->dir_pages[d] = (void *)get_zeroed_page(GFP_KERNEL);
		if (!s->dir_pages[d]) {
			ret = -ENOMEM;
			goto fail;
		}
		dir = s->dir_pages[d];
		dir->gref_dir_next_page = d + 1 < s->dir_npages ? s->dir_grefs[d + 1] : 0;
		for (i = 0; i < n; i++)
			dir->gref[i] = s->buf_grefs[first + i];
		ret = gnttab_grant_foreign_access(be, virt_to_gfn(dir), 0);
		if (ret < 0)
			goto fail;
		s->dir_grefs[d] = ret;
	}
	return 0;
fail:
	vsnd_buffer_free(s);
	return ret;
}

/* Ends every grant; a page still mapped by the backend is freed by the
 * grant table code once the backend lets go of it, never before.
 */
void vsnd_buffer_free(struct vsnd_stream *s)
{
	unsigned int i;

	for (i = 0; s->dir_pages && i < s->dir_npages; i++) {
		if (!s->dir_pages[i])
			continue;
		if (s->dir_grefs[i] != INVALID_GRANT_REF)
			gnttab_end_foreign_access(s->dir_grefs[i], virt_to_page(s->dir_pages[i]));
		else
			free_page((unsigned long)s->dir_pages[i]);
	}
	if (s->buf) {
		/* alloc_pages_exact() split the allocation: pages go one by one. */
		for (i = 0; i < s->buf_npages; i++) {
			struct page *pg = virt_to_page(s->buf + i * PAGE_SIZE);

			if (s->buf_grefs && s->buf_grefs[i] != INVALID_GRANT_REF)
				gnttab_end_foreign_access(s->buf_grefs[i], pg);
			else
				__free_page(pg);
		}
	}
	kfree(s->dir_pages);
	kfree(s->dir_grefs);
	kfree(s->buf_grefs);
	s->dir_pages = NULL;
	s->dir_grefs = NULL;
	s->buf_grefs = NULL;
	s->buf = NULL;
	s->buf_alloc = 0;
	s->buf_npages = 0;
	s->dir_npages = 0;
}
