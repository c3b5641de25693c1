import sys, torch, math
torch.set_num_threads(1)
from lift3d.priors.toyworld.zero123 import ToyZero123, _input_views, input_camera
ck = torch.load(sys.argv[1], weights_only=True, map_location='cpu')
cfg = ck['config']
from lift3d.priors.toyworld.zero123 import initial_model, Zero123TrainConfig
from lift3d.config import parse_structured
m = initial_model(parse_structured(Zero123TrainConfig, {k: v for k, v in cfg.items()} if isinstance(cfg, dict) else cfg, key='x'))
key = sys.argv[2] if len(sys.argv) > 2 else 'ema'
sd = ck[key]
m.load_state_dict(sd if not hasattr(sd, 'state_dict') else sd)
m.eval()
for p in ["a snowman", "a chair", "a mug", "a red cube", "a blue sphere"]:
    errs = []
    for az in range(-180, 180, 30):
        img = _input_views([p], 10.0, float(az)) * 2 - 1
        with torch.no_grad():
            s, c = m.input_pose(img, input_camera(torch.tensor([10.0]), torch.tensor([2.0])))[0].tolist()
        est = math.degrees(math.atan2(s, c)); e = (est - az + 180) % 360 - 180
        errs.append((az, round(est), round(math.hypot(s, c), 2)))
    print(p, errs)
